// A small seedable PRNG for tests that must replay a schedule or content from a seed (mulberry32: 32-bit
// state, uniform doubles in [0, 1)). Not for anything but reproducible test randomness.
export function mulberry32(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Pseudo-random bytes from `random`, so each version of a file is recognisable and a torn mix is not. */
export function seededContent(random: () => number, sizeBytes: number): Buffer {
  const buffer = Buffer.allocUnsafe(Math.ceil(sizeBytes / 4) * 4);
  for (let index = 0; index < buffer.length; index += 4) buffer.writeUInt32LE((random() * 0x100000000) >>> 0, index);
  return buffer.subarray(0, sizeBytes);
}
