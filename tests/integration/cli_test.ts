/**
 * The back end's command line, run as a child process (`main.ts`): bad flags exit with status 2
 * and one line on stderr, creating nothing; `--print-capabilities` prints valid JSON (type vsock,
 * the snapshot/migration features) and exits 0.
 */
import assert from "node:assert/strict";
import { repoRoot } from "../../lib/testing/mod.ts";

const dec = new TextDecoder();

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

Deno.test("CLI: bad flags exit with status 2 and one line on stderr", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vsock-cli-" });
  const base = ["--socket", `${dir}/v.sock`, "--uds-path", `${dir}/u.sock`];
  const cases: string[][] = [
    ["--no-such-flag"],
    ["--guest-cid", "2", ...base],
    ["--guest-cid", "abc", ...base],
    ["--queue-size", "1000", ...base],
    ["--max-connections", "many", ...base],
    ["--connect-timeout-ms", "-5", ...base],
    [...base, "--log-level"],
    ["--log-level", "chatty", ...base],
    ["--vm", "guest-cid=4,bogus=1"],
    ["--vm", "guest-cid=4", "--guest-cid", "5"],
    ["--tx-buffer-size", "0", ...base],
    ["stray-positional", ...base],
  ];
  try {
    const results = await Promise.all(cases.map((args) =>
      new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", `${repoRoot()}/main.ts`, ...args],
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).output()
    ));
    results.forEach((r, i) => {
      const what = cases[i].join(" ");
      const stderr = dec.decode(r.stderr);
      assert.equal(r.code, 2, `${what}: exit status (stderr: ${stderr})`);
      assert.equal(dec.decode(r.stdout), "", `${what}: nothing on stdout`);
      assert.match(stderr, /^[^\n]+\n$/, `${what}: exactly one line on stderr`);
      assert.match(stderr, /^vhost-user-vsock: /, what);
    });
    // Nothing was created for a run that failed.
    assert.deepEqual([...Deno.readDirSync(dir)], []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---------------------------------------------------------------------------------------
// --print-capabilities
// ---------------------------------------------------------------------------------------

Deno.test("--print-capabilities prints valid JSON with type vsock and exits 0", async () => {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${repoRoot()}/main.ts`, "--print-capabilities"],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(60_000),
  }).output();
  const stdout = dec.decode(out.stdout);
  assert.equal(out.code, 0, dec.decode(out.stderr));
  const caps = JSON.parse(stdout);
  assert.equal(typeof caps, "object");
  assert.equal(caps.type, "vsock");
  // the snapshot/migration features are listed
  assert.ok(caps.features.includes("device-state"), stdout);
  assert.ok(caps.features.includes("dirty-log"), stdout);
});
