/**
 * The guest fuzzer (lib/testing/guest_fuzz.ts) against this repository's back end, for long
 * runs on demand:
 *
 *   deno run -A tests/fuzz/guest.ts [--minutes N] [--seed S] [--packed]
 *
 * `fuzzGuestRun` starts a VM whose RAM has two adjacent regions and one after a gap (so rx
 * buffers can straddle regions and run off the end), fuzzes it for `durationMs`, stops it and
 * returns the report; a violation rejects with the seed in the message (FUZZ_SEED replays it).
 */

import { fuzzGuest, type GuestFuzzReport, startVm } from "../../lib/testing/mod.ts";

const MiB = 1024 * 1024;

/** Guest RAM of the fuzzed VM: two adjacent regions, then one after a gap. */
export const FUZZ_REGIONS = [
  { gpa: 0, size: 16 * MiB },
  { gpa: 16 * MiB, size: MiB },
  { gpa: 32 * MiB, size: MiB },
];

export interface FuzzGuestRunOptions {
  readonly seed?: number;
  readonly durationMs?: number;
  readonly iterations?: number;
  readonly log?: (line: string) => void;
  readonly profile?: "qemu" | "crosvm";
  /** run the device over packed virtqueues (VIRTIO_F_RING_PACKED) */
  readonly packed?: boolean;
}

/** Starts a VM, fuzzes its guest side, stops it (see the module doc). */
export async function fuzzGuestRun(opts: FuzzGuestRunOptions = {}): Promise<GuestFuzzReport> {
  const vm = await startVm({
    profile: opts.profile ?? "qemu",
    frontEnd: { regions: FUZZ_REGIONS, packed: opts.packed ?? false },
    guest: { timeoutMs: 20000 },
  });
  try {
    const report = await fuzzGuest(vm, {
      seed: opts.seed,
      durationMs: opts.durationMs,
      iterations: opts.iterations,
      log: opts.log,
    });
    const exit = await vm.stop();
    if (exit.code !== 0) throw new Error(`back end exit ${exit.code}\n${exit.stderr.slice(-4000)}`);
    return report;
  } catch (e) {
    const exit = await vm.stop();
    const msg = e instanceof Error ? e.stack ?? e.message : String(e);
    throw new Error(`${msg}\n--- back end stderr (tail) ---\n${exit.stderr.slice(-6000)}`, {
      cause: e,
    });
  }
}

if (import.meta.main) {
  const args = Deno.args;
  const flag = (name: string) => {
    const i = args.indexOf(name);
    return i >= 0 ? Number(args[i + 1]) : undefined;
  };
  const minutes = flag("--minutes") ?? 1;
  const envSeed = Deno.env.get("FUZZ_SEED");
  const seed = flag("--seed") ?? (envSeed === undefined ? undefined : Number(envSeed));
  const report = await fuzzGuestRun({
    seed,
    durationMs: minutes * 60_000,
    packed: args.includes("--packed"),
    log: (l) => console.log(l),
  });
  console.log(JSON.stringify(report));
}
