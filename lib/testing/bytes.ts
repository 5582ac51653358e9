/**
 * Byte-array helpers shared by the testing library and the tests: the one home of `concat`
 * (joining chunks read from a socket, a guest connection or a pipe into one array).
 */

/** Concatenates byte arrays. */
export function concat(parts: readonly Uint8Array[]): Uint8Array<ArrayBuffer> {
  let total = 0;
  for (const p of parts) total += p.length;
  const out = new Uint8Array(total);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}
