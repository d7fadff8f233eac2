// What this file proves: the resource config parser refuses every malformed or out-of-range input with a
// ConfigError naming the file (and, where there is one, the key), and everything it accepts keeps the
// promises its users rely on (two nodes, valid ports, sizes and durations in range, consistent options).
// How: test/fuzz/config.ts mutates a valid config, seeded (FUZZ_SEED); FUZZ_CONFIG_INPUTS sets the count
// (CI: 50,000; scripts/fuzz.sh runs 1,000,000). The unmutated config must parse, or the fuzzing proves nothing.
import { describe, expect, it } from 'vitest';
import { parseResourceConfig } from '../src/resource/config.js';
import { BASE_CONFIG, configInvariant, runConfigFuzz } from './fuzz/config.js';

const seed = Number(process.env.FUZZ_SEED ?? 0x5eed);
const inputs = Number(process.env.FUZZ_CONFIG_INPUTS ?? 50_000);

describe('config fuzzing', () => {
  it('the base config parses and keeps the invariants', () => {
    expect(configInvariant(parseResourceConfig(BASE_CONFIG, 'fuzz.toml'))).toBeNull();
  });

  it(`refuses or accepts ${inputs} mutated configs, never anything else (seed ${seed})`, () => {
    const started = Date.now();
    const result = runConfigFuzz(seed, inputs);
    console.log(`config fuzz, seed ${seed}: ${result.inputs} inputs, ${result.accepted} accepted, ${result.refused} refused ` +
      `in ${((Date.now() - started) / 1000).toFixed(1)} s, peak RSS ${(result.peakRssBytes / 1048576).toFixed(0)} MiB; ` +
      `refused by key: ${JSON.stringify(result.refusedByKey)}`);
    expect(result.inputs).toBe(inputs);
    // Both outcomes happen: mutations that keep a valid config, and refusals of many different keys.
    expect(result.accepted).toBeGreaterThan(inputs / 100);
    expect(Object.keys(result.refusedByKey).length).toBeGreaterThan(15);
    expect(result.peakRssBytes).toBeLessThan(1024 * 1048576);
  }, 600_000);
});
