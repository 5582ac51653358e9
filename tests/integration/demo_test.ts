/**
 * The demo (`deno task demo`, examples/demo.ts) in its emulated-guest mode, run as a user runs
 * it: a subprocess that must exit 0, tell its story step by step, print the throughput line and
 * end with a clean shutdown, well within a minute.
 */
import assert from "node:assert/strict";
import { repoRoot } from "../../lib/testing/mod.ts";

const DEMO = `${repoRoot()}/examples/demo.ts`;

async function runDemo(args: string[], timeoutMs: number) {
  const started = performance.now();
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", DEMO, ...args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(timeoutMs), // kills the demo if it hangs
  }).output();
  const dec = new TextDecoder();
  return {
    code: out.code,
    signal: out.signal,
    stdout: dec.decode(out.stdout),
    stderr: dec.decode(out.stderr),
    ms: performance.now() - started,
  };
}

Deno.test("demo (emulated guest): exits 0, prints each step, a throughput line and a clean shutdown", async () => {
  const r = await runDemo([], 90_000);
  const where = `\n--- stdout ---\n${r.stdout}\n--- stderr ---\n${r.stderr}`;
  assert.equal(r.code, 0, `exit status (signal ${r.signal})${where}`);
  for (
    const step of [
      /back end started \(pid \d+\)/,
      /negotiated/,
      /guest driver up: CID 3, read from the device config space/,
      /guest listening on vsock port 1234/,
      /sent "CONNECT 1234" .*, got "OK \d+"/,
      /echoed \d+ bytes through the guest, intact/,
      /guest connected to host port 5000/,
      /the host echoed them back intact/,
      /shutdown: .*exit status 0/,
    ]
  ) {
    assert.match(r.stdout, step, `missing step ${step}${where}`);
  }
  const m =
    /^\[\d+\] throughput: host -> guest -> host echo ([\d.]+) MiB\/s .*guest -> host ([\d.]+) MiB\/s/m
      .exec(r.stdout);
  assert.ok(m !== null, `no throughput line${where}`);
  assert.ok(Number(m[1]) > 0 && Number(m[2]) > 0, `throughput figures: ${m[0]}`);
  // Steps are numbered in order.
  const numbers = [...r.stdout.matchAll(/^\[(\d+)\]/gm)].map((x) => Number(x[1]));
  assert.deepEqual(numbers, numbers.map((_, i) => i + 1));
  assert.ok(r.ms < 60_000, `the demo took ${(r.ms / 1000).toFixed(1)} s`);
});

Deno.test("demo: an unknown argument is a usage error (exit 2)", async () => {
  const r = await runDemo(["--bogus"], 30_000);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /unknown argument --bogus/);
});
