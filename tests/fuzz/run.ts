/**
 * `deno task fuzz [--minutes N] [--seed S] [--only guest|front-end|host-apps] [--packed]`: the long run
 * of the three fuzzers of the hostile-inputs campaign, one after the other, each for N
 * minutes (default 1): a hostile guest (lib/testing/guest_fuzz.ts), a hostile vhost-user
 * front end (front_end.ts) and hostile host apps (host_apps.ts). Each prints its seed first
 * and its report last; a violated invariant ends the run with the seed in the message, and
 * `--seed S` (or FUZZ_SEED) replays it. CI runs a few seconds of each
 * (tests/integration/fuzz_*_test.ts).
 */
import { parseArgs } from "node:util";
import { fuzzFrontEnd } from "./front_end.ts";
import { fuzzGuestRun } from "./guest.ts";
import { fuzzHostApps } from "./host_apps.ts";

const FUZZERS = ["guest", "front-end", "host-apps"] as const;

const { values } = parseArgs({
  args: Deno.args,
  options: {
    minutes: { type: "string", default: "1" },
    seed: { type: "string" },
    only: { type: "string" },
    packed: { type: "boolean", default: false },
  },
});
const durationMs = Number(values.minutes) * 60_000;
const given = values.seed ?? Deno.env.get("FUZZ_SEED");
const only = values.only;
if (!(durationMs > 0) || (only !== undefined && !FUZZERS.includes(only as never))) {
  console.error(
    `usage: deno task fuzz [--minutes N] [--seed S] [--only ${FUZZERS.join("|")}] [--packed]`,
  );
  Deno.exit(2);
}
const seedFor = () =>
  given !== undefined ? Number(given) : crypto.getRandomValues(new Uint32Array(1))[0];
const log = (l: string) => console.log(l);

for (const name of FUZZERS) {
  if (only !== undefined && only !== name) continue;
  const seed = seedFor();
  console.log(`== ${name} fuzzer: ${values.minutes} min, seed ${seed}`);
  const t0 = performance.now();
  const report = name === "guest"
    ? await fuzzGuestRun({ seed, durationMs, log, packed: values.packed })
    : name === "front-end"
    ? await fuzzFrontEnd({ seed, durationMs, log })
    : await fuzzHostApps({ seed, durationMs, log });
  console.log(`== ${name}: ok in ${((performance.now() - t0) / 1000).toFixed(0)} s`);
  console.log(JSON.stringify(report));
}
