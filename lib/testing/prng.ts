/**
 * The seeded PRNG of the testing library's fuzzers and stress tests (mulberry32): 32 bits
 * of state, so a run replays from its seed alone. Not for anything that needs
 * unpredictability.
 */

/** A PRNG seeded with `seed`: each call returns a float in [0, 1). */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
