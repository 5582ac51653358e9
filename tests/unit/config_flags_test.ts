/**
 * Tests for lib/config.ts's command line (single-VM and daemon-wide flags, their defaults,
 * ranges and one-line errors; the tuning, scheduling and worker flags), USAGE, and
 * lib/capabilities.ts (--print-capabilities JSON).
 */

import assert from "node:assert/strict";
import {
  type DaemonConfig,
  DEFAULT_CONNECT_TIMEOUT_MS,
  DEFAULT_MAX_CONNECTIONS,
  DEFAULT_QUEUE_SIZE,
  DEFAULT_TX_BUFFER_SIZE,
  DEFAULT_WATCHDOG_MS,
  defaultDaemonConfig,
  defaultWorkerCount,
  parseArgs,
  parseConfigDocument,
  USAGE,
  VERSION,
} from "../../lib/config.ts";
import { capabilitiesJson, VHOST_USER_BACKEND_TYPE } from "../../lib/capabilities.ts";
import { assertValidVms, rejects, vm } from "./config_fixture.ts";

/** The daemon configuration of an empty command line (one default VM), `overrides` applied. */
function daemon(overrides: Partial<DaemonConfig> = {}): DaemonConfig {
  return {
    vms: [vm()],
    logLevel: "info",
    printCapabilities: false,
    datagrams: false,
    rxWeights: [],
    connectTimeoutMs: 2000,
    maxConnections: 1023,
    ...overrides,
  };
}

// ---------------------------------------------------------------------------------------------
// Defaults and single-VM flags

Deno.test("no flags at all: one VM with the documented defaults", () => {
  assert.deepEqual(parseArgs([]), daemon());
  assert.deepEqual(defaultDaemonConfig(), daemon());
  assert.equal(DEFAULT_TX_BUFFER_SIZE, 64 * 1024);
  assert.equal(DEFAULT_QUEUE_SIZE, 1024);
  assert.equal(DEFAULT_CONNECT_TIMEOUT_MS, 2000);
  assert.equal(DEFAULT_MAX_CONNECTIONS, 1023);
});

Deno.test("--guest-cid also moves the default socket paths", () => {
  assert.deepEqual(
    parseArgs(["--guest-cid", "4"]).vms,
    [vm({ guestCid: 4, socket: "/tmp/vhost4.socket", udsPath: "/tmp/vm4.vsock" })],
  );
  assert.equal(parseArgs(["--guest-cid=4294967294"]).vms[0].guestCid, 0xfffffffe);
});

Deno.test("every single-VM flag, separate and inline values", () => {
  const cfg = parseArgs([
    "--guest-cid=5",
    "--socket",
    "/run/v.sock",
    "--uds-path=/run/vm5.vsock",
    "--tx-buffer-size",
    "32768",
    "--queue-size=256",
    "--groups",
    "group1+groupA",
  ]);
  assert.deepEqual(
    cfg,
    daemon({
      vms: [{
        guestCid: 5,
        socket: "/run/v.sock",
        udsPath: "/run/vm5.vsock",
        txBufferSize: 32768,
        queueSize: 256,
        groups: ["group1", "groupA"],
      }],
    }),
  );
});

Deno.test("--socket-path is an alias of --socket", () => {
  assert.equal(parseArgs(["--socket-path", "/run/a.sock"]).vms[0].socket, "/run/a.sock");
  rejects(() => parseArgs(["--socket", "/a", "--socket-path", "/b"]), /--socket-path.*only one/);
});

Deno.test("--fd: inherited socket, no socket path, excludes --socket", () => {
  const cfg = parseArgs(["--fd", "3", "--guest-cid", "7"]);
  assert.equal(cfg.socketFd, 3);
  assert.equal(cfg.vms[0].socket, "");
  assert.equal(cfg.vms[0].udsPath, "/tmp/vm7.vsock");
  assertValidVms(cfg.vms, true);
  assert.equal(parseArgs([]).socketFd, undefined);
  assert.equal(parseArgs(["--fd=2147483647"]).socketFd, 2147483647);
  rejects(
    () => parseArgs(["--fd", "3", "--socket", "/a"]),
    /^--fd: cannot be combined with --socket/,
  );
  rejects(() => parseArgs(["--fd", "3", "--socket-path", "/a"]), /--fd.*--socket-path/);
  rejects(() => parseArgs(["--fd", "2"]), /^--fd: "2" is out of range 3\.\./);
  rejects(() => parseArgs(["--fd", "2147483648"]), /^--fd: .*out of range/);
  rejects(() => parseArgs(["--fd", "x"]), /^--fd: "x" is not a decimal integer/);
  rejects(
    () => parseArgs(["--fd", "3", "--vm", "guest-cid=4"]),
    /^--fd: cannot be combined with --vm/,
  );
});

Deno.test("--groups: '+' separated, trimmed, no empty or repeated names", () => {
  assert.deepEqual(parseArgs(["--groups", "a"]).vms[0].groups, ["a"]);
  assert.deepEqual(parseArgs(["--groups", " a + b "]).vms[0].groups, ["a", "b"]);
  rejects(() => parseArgs(["--groups", ""]), /^--groups: empty group name/);
  rejects(() => parseArgs(["--groups", "a++b"]), /^--groups: empty group name/);
  rejects(() => parseArgs(["--groups", "a+"]), /^--groups: empty group name/);
  rejects(() => parseArgs(["--groups", "a+b+a"]), /^--groups: group "a" is listed twice/);
});

Deno.test("guest CIDs: reserved, out of range, not numbers", () => {
  rejects(
    () => parseArgs(["--guest-cid", "0"]),
    /^--guest-cid: CID 0 is reserved \(VMADDR_CID_HYPERVISOR\)$/,
  );
  rejects(() => parseArgs(["--guest-cid", "1"]), /^--guest-cid: CID 1 is reserved/);
  rejects(
    () => parseArgs(["--guest-cid", "2"]),
    /^--guest-cid: CID 2 is reserved \(VMADDR_CID_HOST, the host\)$/,
  );
  rejects(
    () => parseArgs(["--guest-cid", "4294967295"]),
    /CID 4294967295 is reserved \(VMADDR_CID_ANY\)/,
  );
  rejects(() => parseArgs(["--guest-cid", "4294967296"]), /out of range 3\.\.4294967294/);
  rejects(() => parseArgs(["--guest-cid", "99999999999999999999"]), /out of range/);
  rejects(() => parseArgs(["--guest-cid", "3.0"]), /not a decimal integer/);
  rejects(() => parseArgs(["--guest-cid", "0x10"]), /not a decimal integer/);
  rejects(() => parseArgs(["--guest-cid", ""]), /not a decimal integer/);
  rejects(() => parseArgs(["--guest-cid=-3"]), /not a decimal integer/);
  rejects(() => parseArgs(["--guest-cid", "+3"]), /not a decimal integer/);
  assert.equal(parseArgs(["--guest-cid", " 3 "]).vms[0].guestCid, 3);
  assert.equal(parseArgs(["--guest-cid", "0004"]).vms[0].guestCid, 4);
});

Deno.test("--queue-size: power of 2 in 1..32768", () => {
  for (const n of [1, 2, 128, 1024, 32768]) {
    assert.equal(parseArgs(["--queue-size", String(n)]).vms[0].queueSize, n);
  }
  rejects(() => parseArgs(["--queue-size", "1000"]), /^--queue-size: 1000 is not a power of 2/);
  rejects(() => parseArgs(["--queue-size", "0"]), /out of range 1\.\.32768/);
  rejects(() => parseArgs(["--queue-size", "65536"]), /out of range 1\.\.32768/);
});

Deno.test("--tx-buffer-size: 1..u32", () => {
  assert.equal(parseArgs(["--tx-buffer-size", "1"]).vms[0].txBufferSize, 1);
  assert.equal(
    parseArgs(["--tx-buffer-size", "4294967295"]).vms[0].txBufferSize,
    4294967295,
  );
  rejects(() => parseArgs(["--tx-buffer-size", "0"]), /^--tx-buffer-size: "0" is out of range/);
  rejects(() => parseArgs(["--tx-buffer-size", "4294967296"]), /out of range/);
  rejects(() => parseArgs(["--tx-buffer-size", "64K"]), /not a decimal integer/);
});

Deno.test("socket paths: non-empty, no NUL, fit sun_path", () => {
  rejects(() => parseArgs(["--socket", ""]), /^--socket: the path is empty/);
  rejects(() => parseArgs(["--uds-path="]), /^--uds-path: the path is empty/);
  rejects(() => parseArgs(["--socket", "/a\0b"]), /NUL/);
  const longest = "/" + "x".repeat(106); // 107 bytes + NUL = 108
  assert.equal(parseArgs(["--socket", longest]).vms[0].socket, longest);
  rejects(() => parseArgs(["--socket", longest + "x"]), /^--socket: .*longer than 107 bytes/);
  rejects(() => parseArgs(["--uds-path", "/" + "é".repeat(54)]), /longer than 107 bytes/);
  rejects(() => parseArgs(["--socket", "/x", "--uds-path", "/x"]), /^--uds-path: "\/x" is both/);
  // with --fd there is no socket path to collide with
  assert.equal(parseArgs(["--fd=3", "--uds-path=/tmp/vhost3.socket"]).vms[0].socket, "");
});

Deno.test("daemon-wide flags", () => {
  for (const level of ["error", "warn", "info", "debug", "trace"] as const) {
    assert.equal(parseArgs(["--log-level", level]).logLevel, level);
  }
  assert.equal(parseArgs(["--log-level=DEBUG"]).logLevel, "debug");
  rejects(() => parseArgs(["--log-level", "verbose"]), /^--log-level: "verbose" is not one of/);
  assert.equal(parseArgs(["--dgram"]).datagrams, true);
  assert.equal(parseArgs([]).datagrams, false);
  rejects(() => parseArgs(["--dgram=yes"]), /does not take an argument/);
  assert.equal(parseArgs(["--connect-timeout-ms", "10"]).connectTimeoutMs, 10);
  rejects(() => parseArgs(["--connect-timeout-ms", "0"]), /^--connect-timeout-ms: .*out of range/);
  rejects(() => parseArgs(["--connect-timeout-ms", "1s"]), /not a decimal integer/);
  assert.equal(parseArgs(["--max-connections", "1"]).maxConnections, 1);
  rejects(() => parseArgs(["--max-connections", "0"]), /^--max-connections: .*out of range/);
  rejects(() => parseArgs(["--max-connections", "99999999"]), /out of range/);
  const cfg = parseArgs(["--vm", "guest-cid=9", "--dgram", "--log-level", "trace"]);
  assert.equal(cfg.datagrams, true);
  assert.equal(cfg.logLevel, "trace");
});

Deno.test("--print-capabilities, --help and --version win and ignore everything else", () => {
  const caps = parseArgs(["--bogus", "--guest-cid", "0", "--print-capabilities", "x"]);
  assert.equal(caps.printCapabilities, true);
  assert.equal(parseArgs(["--help", "--vm", ""]).printHelp, true);
  assert.equal(parseArgs(["-h"]).printHelp, true);
  assert.equal(parseArgs(["--version", "--nope"]).printVersion, true);
  assert.equal(parseArgs(["-V"]).printVersion, true);
  const plain = parseArgs([]);
  assert.equal(plain.printCapabilities, false);
  assert.ok(!plain.printHelp && !plain.printVersion);
  // after "--" they are positional arguments, which the daemon does not take
  rejects(() => parseArgs(["--", "--help"]), /Unexpected argument/);
  assert.match(VERSION, /^\d+\.\d+\.\d+/);
});

Deno.test("command line syntax errors", () => {
  rejects(() => parseArgs(["--bogus"]), /^Unknown option '--bogus'\.?$/);
  rejects(() => parseArgs(["-x"]), /Unknown option '-x'/);
  rejects(() => parseArgs(["extra"]), /Unexpected argument 'extra'/);
  rejects(() => parseArgs(["--socket"]), /argument missing/);
  rejects(() => parseArgs(["--guest-cid", "-3"]), /ambiguous.*--option=VALUE/);
  rejects(
    () => parseArgs(["--guest-cid", "3", "--guest-cid=4"]),
    /^--guest-cid: given more than once/,
  );
  rejects(() => parseArgs(["--dgram", "--dgram"]), /^--dgram: given more than once/);
  rejects(() => parseArgs(["--config", "a", "--config", "b"]), /^--config: given more than once/);
});

// ---------------------------------------------------------------------------------------------
// Tuning, scheduling and worker flags

Deno.test("--poll-us, --no-autotune, --max-buffer-memory", () => {
  assert.equal(parseArgs([]).pollUs, undefined);
  assert.equal(parseArgs(["--poll-us", "50"]).pollUs, 50);
  assert.throws(() => parseArgs(["--poll-us", "20000"]), /out of range 0\.\.10000/);
  assert.equal(parseArgs(["--no-autotune"]).noAutotune, true);
  assert.equal(parseArgs(["--max-buffer-memory", "1048576"]).maxBufferMemory, 1048576);
  for (const flag of ["--poll-us N", "--no-autotune", "--max-buffer-memory N", "--rx-weight"]) {
    assert.ok(USAGE.includes(flag), flag);
  }
});

Deno.test("--rx-weight PORT=N: repeatable, validated", () => {
  const cfg = parseArgs(["--rx-weight", "22=4", "--rx-weight", "80=2"]);
  assert.deepEqual(cfg.rxWeights, [[22, 4], [80, 2]]);
  assert.deepEqual(parseArgs([]).rxWeights, []);
  // The configuration crosses to worker processes as JSON.
  assert.deepEqual(JSON.parse(JSON.stringify(cfg)).rxWeights, [[22, 4], [80, 2]]);
  assert.throws(() => parseArgs(["--rx-weight", "22"]), /--rx-weight: "22" is not PORT=N/);
  assert.throws(() => parseArgs(["--rx-weight", "22=0"]), /out of range 1\.\.64/);
  assert.throws(() => parseArgs(["--rx-weight", "x=2"]), /not a decimal integer/);
});

Deno.test("--workers, --watchdog-ms, --watchdog-restart and YAML workers:", () => {
  const base = parseArgs([]);
  assert.equal(base.workers, undefined, "unset: one per VM up to the CPU count");
  assert.equal(defaultWorkerCount(1, 8), 1);
  assert.equal(defaultWorkerCount(32, 2), 2);
  assert.equal(defaultWorkerCount(3, 16), 3);
  assert.equal(parseArgs(["--workers", "0"]).workers, 0);
  assert.equal(parseArgs(["--workers=4"]).workers, 4);
  rejects(() => parseArgs(["--workers=-1"]), /^--workers: "-1" is not a decimal integer/);
  rejects(() => parseArgs(["--workers", "257"]), /^--workers: "257" is out of range 0..256/);
  rejects(
    () => parseArgs(["--workers", "2", "--workers", "3"]),
    /^--workers: given more than once/,
  );
  const w = parseArgs(["--watchdog-ms", "1500", "--watchdog-restart"]);
  assert.equal(w.watchdogMs, 1500);
  assert.equal(w.watchdogRestart, true);
  rejects(() => parseArgs(["--watchdog-ms", "5"]), /^--watchdog-ms: "5" is out of range/);
  assert.equal(DEFAULT_WATCHDOG_MS, 5000);
  assert.deepEqual(parseConfigDocument("workers: 3\nvms: [{}]\n").workers, 3);
  assert.equal(parseConfigDocument("vms: [{}]\n").workers, undefined);
  rejects(() => parseConfigDocument("workers: many\nvms: [{}]\n"), /^config: workers: /);
  const dir = Deno.makeTempDirSync();
  try {
    Deno.writeTextFileSync(`${dir}/c.yaml`, "workers: 2\nvms: [{guest_cid: 5}]\n");
    assert.equal(parseArgs(["--config", `${dir}/c.yaml`]).workers, 2);
    assert.equal(
      parseArgs(["--config", `${dir}/c.yaml`, "--workers", "1"]).workers,
      1,
      "flag wins",
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
  for (const flag of ["--workers N", "--watchdog-ms MS", "--watchdog-restart"]) {
    assert.ok(USAGE.includes(flag), flag);
  }
});

// ---------------------------------------------------------------------------------------------
// USAGE and capabilities

Deno.test("USAGE lists every flag and every default", () => {
  for (
    const flag of [
      "--guest-cid",
      "--socket",
      "--socket-path",
      "--fd",
      "--uds-path",
      "--tx-buffer-size",
      "--queue-size",
      "--groups",
      "--vm",
      "--config",
      "--log-level",
      "--dgram",
      "--connect-timeout-ms",
      "--max-connections",
      "--print-capabilities",
      "--help",
      "--version",
    ]
  ) {
    assert.match(USAGE, new RegExp(`^\\s+(-\\w, )?${flag}\\b`, "m"), flag);
  }
  for (
    const dflt of [
      "(default: 3)",
      "(default: /tmp/vhost<guest-cid>.socket)",
      "(default: /tmp/vm<guest-cid>.vsock)",
      "(default: 65536)",
      "(default: 1024)",
      "(default: default)",
      "(default: info)",
      "(default: off)",
      "(default: 2000)",
      "(default: 1023)",
    ]
  ) {
    assert.ok(USAGE.includes(dflt), dflt);
  }
  for (const line of USAGE.split("\n")) assert.ok(line.length <= 100, line);
  assert.ok(USAGE.includes(VERSION));
});

Deno.test("--print-capabilities JSON follows vhost-user.json VHostUserBackendCapabilities", () => {
  assert.equal(VHOST_USER_BACKEND_TYPE, "vsock");
  assert.deepEqual(JSON.parse(capabilitiesJson()), {
    type: "vsock",
    features: [
      "device-state",
      "dirty-log",
      "siblings",
      "seqpacket",
      "datagrams",
      "fair-rx",
      "packed-rings",
    ],
  });
  assert.equal(capabilitiesJson([]), '{\n  "type": "vsock"\n}');
  assert.deepEqual(JSON.parse(capabilitiesJson(["dgram"])), { type: "vsock", features: ["dgram"] });
});
