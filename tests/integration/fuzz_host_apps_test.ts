/**
 * A bounded run of the host-app fuzzer (tests/fuzz/host_apps.ts) in CI: a few seconds of
 * random hostile behaviour on the hybrid-vsock socket with a random seed, printed first.
 * Replay a failure with `FUZZ_SEED=<seed>`; make the run longer with `FUZZ_MS=<ms>`.
 */
import { fuzzHostApps } from "../fuzz/host_apps.ts";

Deno.test({
  name: "host-app fuzzer: hostile CONNECT lines, storms, half-open and abrupt sockets",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const env = Deno.env.get("FUZZ_SEED");
    const seed = env !== undefined
      ? Number(env) >>> 0
      : crypto.getRandomValues(new Uint32Array(1))[0];
    const durationMs = Number(Deno.env.get("FUZZ_MS") ?? 4000);
    await fuzzHostApps({ seed, durationMs, log: (s) => console.log(s) });
  },
});
