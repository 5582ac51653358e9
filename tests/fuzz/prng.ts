/**
 * The fuzzers' seeded PRNG (mulberry32): 32 bits of state, so a run replays from its seed
 * alone. Not for anything that needs unpredictability.
 */

export { mulberry32 } from "../../lib/testing/prng.ts";
