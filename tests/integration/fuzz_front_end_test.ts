/**
 * A bounded run (~5 s) of the front-end fuzzer (`tests/fuzz/front_end.ts`): random and
 * hostile vhost-user messages, fds and reconnects against main.ts, with the back end's
 * liveness, reply discipline, fd count, RSS and log rate checked after every step.
 *
 * The seed is random and printed; `FUZZ_SEED=<n>` replays a run, `FUZZ_MS=<ms>` runs longer.
 */
import { fuzzFrontEnd } from "../fuzz/front_end.ts";

Deno.test({
  name: "front-end fuzz: hostile vhost-user messages and reconnects for ~5 s",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const fromEnv = Deno.env.get("FUZZ_SEED");
    const seed = fromEnv !== undefined
      ? Number(fromEnv)
      : crypto.getRandomValues(new Uint32Array(1))[0];
    const durationMs = Number(Deno.env.get("FUZZ_MS") ?? 5000);
    await fuzzFrontEnd({ seed, durationMs });
  },
});
