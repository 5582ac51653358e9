/**
 * Bounded runs (~5 s each, over split and over packed virtqueues) of the hostile-guest fuzzer (lib/testing/guest_fuzz.ts, through
 * tests/fuzz/guest.ts) against the back end. The seed is random and printed; FUZZ_SEED=<n>
 * replays a run's sequence of steps.
 */

import assert from "node:assert/strict";
import { withTimeout } from "../../lib/testing/mod.ts";
import { fuzzGuestRun } from "../fuzz/guest.ts";

for (const packed of [false, true]) {
  Deno.test(
    `guest fuzz (${
      packed ? "packed" : "split"
    } rings): random rx layouts, tx headers, kicks and ring restarts keep every invariant`,
    withTimeout(90_000, async () => {
      const env = Deno.env.get("FUZZ_SEED");
      const seed = env === undefined ? undefined : Number(env);
      const report = await fuzzGuestRun({
        seed,
        durationMs: 5000,
        packed,
        log: (l) => console.log(l),
      });
      assert.ok(report.iterations > 50, `only ${report.iterations} steps in 5 s`);
      assert.ok(report.verifiedBytes > 0, "the well-behaved connection carried data");
    }),
  );
}
