// Types for the parts of the `lz4` package (block API) the resync uses; the package ships none.
declare module 'lz4' {
  /** Compressed size written to `output`, or 0 when the input did not compress. */
  export function encodeBlock(input: Uint8Array, output: Uint8Array): number;
  /** Bytes written to `output`; negative on corrupt input. */
  export function decodeBlock(input: Uint8Array, output: Uint8Array): number;
  export function encodeBound(inputSizeBytes: number): number;
  const lz4: { encodeBlock: typeof encodeBlock; decodeBlock: typeof decodeBlock; encodeBound: typeof encodeBound };
  export default lz4;
}
