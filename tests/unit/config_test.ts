/**
 * Tests for lib/config.ts (flags, --vm specs, YAML files, cross-VM checks) and
 * lib/capabilities.ts (--print-capabilities JSON).
 */

import assert from "node:assert/strict";
import fc from "fast-check";
import { stringify } from "yaml";
import {
  ConfigError,
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
  parseConfigYaml,
  parseVmSpec,
  USAGE,
  VERSION,
  type VmConfig,
} from "../../lib/config.ts";
import { capabilitiesJson, VHOST_USER_BACKEND_TYPE } from "../../lib/capabilities.ts";

/** Assert that `fn` throws a ConfigError whose one-line message matches `pattern`. */
function rejects(fn: () => unknown, pattern: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof ConfigError, `expected ConfigError, got ${e}`);
    assert.ok(!e.message.includes("\n"), `multi-line message: ${JSON.stringify(e.message)}`);
    assert.match(e.message, pattern);
    return true;
  });
}

function vm(overrides: Partial<VmConfig> = {}): VmConfig {
  return {
    guestCid: 3,
    socket: "/tmp/vhost3.socket",
    udsPath: "/tmp/vm3.vsock",
    txBufferSize: 65536,
    queueSize: 1024,
    groups: ["default"],
    ...overrides,
  };
}

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

/** Invariants every accepted configuration satisfies. */
function assertValidVms(vms: readonly VmConfig[], fromFd = false): void {
  assert.ok(vms.length >= 1);
  const cids = new Set<number>();
  const paths = new Set<string>();
  for (const v of vms) {
    assert.ok(Number.isInteger(v.guestCid) && v.guestCid >= 3 && v.guestCid <= 0xfffffffe);
    assert.ok(!cids.has(v.guestCid));
    cids.add(v.guestCid);
    for (const p of fromFd ? [v.udsPath] : [v.socket, v.udsPath]) {
      assert.equal(typeof p, "string");
      assert.ok(p.length > 0 && !p.includes("\0") && new TextEncoder().encode(p).length < 108);
      assert.ok(!paths.has(p));
      paths.add(p);
    }
    assert.ok(Number.isInteger(v.txBufferSize) && v.txBufferSize >= 1);
    assert.ok(v.txBufferSize <= 0xffffffff);
    assert.ok(Number.isInteger(v.queueSize) && v.queueSize >= 1 && v.queueSize <= 32768);
    assert.equal(v.queueSize & (v.queueSize - 1), 0);
    assert.ok(Array.isArray(v.groups) && v.groups.length >= 1);
    assert.equal(new Set(v.groups).size, v.groups.length);
    for (const g of v.groups) assert.ok(g.length > 0 && g === g.trim() && !g.includes("+"));
  }
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
// --vm

Deno.test("--vm: the README example, repeated", () => {
  const cfg = parseArgs([
    "--vm",
    "guest-cid=3,socket=/tmp/vhost3.socket,uds-path=/tmp/vm3.vsock,groups=group1+groupA",
    "--vm",
    "guest-cid=4,socket=/tmp/vhost4.socket,uds-path=/tmp/vm4.vsock,tx-buffer-size=32768,queue-size=256",
  ]);
  assert.deepEqual(cfg.vms, [
    vm({ groups: ["group1", "groupA"] }),
    vm({
      guestCid: 4,
      socket: "/tmp/vhost4.socket",
      udsPath: "/tmp/vm4.vsock",
      txBufferSize: 32768,
      queueSize: 256,
    }),
  ]);
  assert.equal(cfg.socketFd, undefined);
});

Deno.test("--vm: underscore keys, socket-path alias, whitespace, defaults", () => {
  assert.deepEqual(
    parseVmSpec(
      " guest_cid=8, socket_path=/s , uds_path=/u,tx_buffer_size=4096,queue_size=64,groups=x ",
    ),
    { guestCid: 8, socket: "/s", udsPath: "/u", txBufferSize: 4096, queueSize: 64, groups: ["x"] },
  );
  assert.deepEqual(parseVmSpec("socket-path=/s"), vm({ socket: "/s" }));
  assert.deepEqual(
    parseVmSpec("guest-cid=12"),
    vm({ guestCid: 12, socket: "/tmp/vhost12.socket", udsPath: "/tmp/vm12.vsock" }),
  );
  assert.equal(parseVmSpec("socket=/a=b").socket, "/a=b"); // a value is all after the first '='
});

Deno.test("--vm: malformed specs", () => {
  rejects(() => parseVmSpec(""), /^--vm: empty VM specification/);
  rejects(() => parseVmSpec("   "), /^--vm: empty VM specification/);
  rejects(() => parseVmSpec("guest-cid=3,"), /^--vm "guest-cid=3,": empty item/);
  rejects(() => parseVmSpec(",guest-cid=3"), /empty item/);
  rejects(() => parseVmSpec("guest-cid"), /"guest-cid" is not key=value/);
  rejects(() => parseVmSpec("group=a"), /unknown key "group" \(known: guest-cid, socket/);
  rejects(() => parseVmSpec("forward-cid=1"), /unknown key "forward-cid"/);
  rejects(() => parseVmSpec("constructor=1"), /unknown key "constructor"/);
  rejects(() => parseVmSpec("__proto__=1"), /unknown key "__proto__"/);
  rejects(() => parseVmSpec("=3"), /unknown key ""/);
  rejects(
    () => parseVmSpec("guest-cid=3,guest_cid=4"),
    /: guest_cid: given twice \(already as .*: guest-cid\)/,
  );
  rejects(() => parseVmSpec("socket=/a,socket-path=/b"), /socket-path: given twice/);
  rejects(() => parseVmSpec("guest-cid=2"), /^--vm "guest-cid=2": guest-cid: CID 2 is reserved/);
  rejects(() => parseVmSpec("guest-cid="), /guest-cid: "" is not a decimal integer/);
  rejects(() => parseVmSpec("queue-size=100"), /queue-size: 100 is not a power of 2/);
  rejects(() => parseVmSpec("tx-buffer-size=0"), /tx-buffer-size: .*out of range/);
  rejects(() => parseVmSpec("socket="), /socket: the path is empty/);
  rejects(() => parseVmSpec("groups=a+"), /groups: empty group name/);
  rejects(() => parseVmSpec("x".repeat(500)), /^--vm "x{60}\.\.\.": /); // quoted, bounded
  rejects(() => parseVmSpec("a\nb=1"), /^--vm "a\\nb=1": unknown key "a\\nb"/); // one line
});

Deno.test("--vm: cross-VM checks", () => {
  rejects(
    () => parseArgs(["--vm", "guest-cid=3,socket=/a", "--vm", "guest-cid=3,socket=/b"]),
    /^VM #2 \(guest CID 3\): guest CID 3 is already used by VM #1/,
  );
  rejects(
    () => parseArgs(["--vm", "guest-cid=3,socket=/s", "--vm", "guest-cid=4,socket=/s"]),
    /^VM #2 \(guest CID 4\): socket "\/s" is already the socket of VM #1/,
  );
  rejects(
    () => parseArgs(["--vm", "guest-cid=3,uds-path=/u", "--vm", "guest-cid=4,socket=/u"]),
    /socket "\/u" is already the uds-path of VM #1/,
  );
  rejects(
    () => parseArgs(["--vm", "socket=/x,uds-path=/x"]),
    /^--vm "socket=\/x,uds-path=\/x": uds-path: "\/x" is both the socket and the uds-path/,
  );
  rejects(() => parseVmSpec("socket=/tmp/vm3.vsock"), /: socket: "\/tmp\/vm3.vsock" is both/);
  // default paths follow the CID, so distinct CIDs need nothing else
  const cfg = parseArgs(["--vm", "guest-cid=3", "--vm", "guest-cid=4", "--vm", "guest-cid=5"]);
  assert.equal(cfg.vms.length, 3);
  assertValidVms(cfg.vms);
});

Deno.test("--vm and --config exclude each other and the single-VM flags", () => {
  const file = writeConfig("vms:\n  - guest_cid: 5\n");
  rejects(
    () => parseArgs(["--vm", "guest-cid=4", "--config", file]),
    /^--config: cannot be combined with --vm/,
  );
  for (const flag of ["--guest-cid=4", "--socket=/a", "--socket-path=/a", "--uds-path=/u"]) {
    rejects(() => parseArgs(["--vm", "guest-cid=9", flag]), /cannot be combined with --vm/);
    rejects(() => parseArgs(["--config", file, flag]), /cannot be combined with --config/);
  }
  for (const flag of ["--tx-buffer-size=4096", "--queue-size=128", "--groups=a", "--fd=3"]) {
    rejects(
      () => parseArgs([flag, "--vm", "guest-cid=9"]),
      /^--[a-z-]+: cannot be combined with --vm/,
    );
    rejects(() => parseArgs([flag, "--config", file]), /cannot be combined with --config/);
  }
});

// ---------------------------------------------------------------------------------------------
// YAML

const README_YAML = `vms:
    - guest_cid: 3
      socket: /tmp/vhost3.socket
      uds_path: /tmp/vm3.vsock
      tx_buffer_size: 65536
      queue_size: 1024
      groups: group1+groupA
    - guest_cid: 4
      socket: /tmp/vhost4.socket
      uds_path: /tmp/vm4.vsock
      tx_buffer_size: 32768
      queue_size: 256
      groups: group2+groupB
`;

Deno.test("YAML: the vhost-device-vsock example", () => {
  assert.deepEqual(parseConfigYaml(README_YAML), [
    vm({ groups: ["group1", "groupA"] }),
    vm({
      guestCid: 4,
      socket: "/tmp/vhost4.socket",
      udsPath: "/tmp/vm4.vsock",
      txBufferSize: 32768,
      queueSize: 256,
      groups: ["group2", "groupB"],
    }),
  ]);
});

Deno.test("YAML: defaults, dashed keys, group lists, quoted numbers, flow style", () => {
  assert.deepEqual(parseConfigYaml("vms:\n  - socket: /s\n    uds_path: /u\n"), [
    vm({ socket: "/s", udsPath: "/u" }),
  ]);
  assert.deepEqual(parseConfigYaml("vms: [{guest-cid: 6, groups: [a, b]}]"), [
    vm({
      guestCid: 6,
      socket: "/tmp/vhost6.socket",
      udsPath: "/tmp/vm6.vsock",
      groups: ["a", "b"],
    }),
  ]);
  assert.equal(parseConfigYaml("vms:\n- guest_cid: '7'\n")[0].guestCid, 7);
  assert.equal(parseConfigYaml("vms:\n- queue_size: 0x100\n")[0].queueSize, 256);
  assert.equal(parseConfigYaml("# comment\nvms:\n- {}\n")[0].guestCid, 3);
  assert.deepEqual(
    parseConfigYaml("vms:\n- {guest_cid: 4, groups: &g [a, b]}\n- {guest_cid: 5, groups: *g}\n")
      .map((v) => v.groups),
    [["a", "b"], ["a", "b"]],
  );
});

Deno.test("YAML: structural errors", () => {
  rejects(() => parseConfigYaml(""), /^config: the file is empty/);
  rejects(() => parseConfigYaml("# nothing\n"), /^config: the file is empty/);
  rejects(() => parseConfigYaml("- a\n"), /^config: expected a mapping with vms:, got a list/);
  rejects(() => parseConfigYaml("hello"), /^config: expected a mapping.*the string "hello"/);
  rejects(() => parseConfigYaml("vm:\n  - {}\n"), /^config: unknown top-level key "vm"/);
  rejects(() => parseConfigYaml("vms: []\nlog: 1\n"), /unknown top-level key "log"/);
  rejects(() => parseConfigYaml("vms:\n"), /^config: vms: expected a list of VMs, got nothing/);
  rejects(() => parseConfigYaml("vms: 3\n"), /^config: vms: expected a list of VMs/);
  rejects(() => parseConfigYaml("vms: []\n"), /^config: vms: the list is empty/);
  rejects(() => parseConfigYaml("vms:\n  - 3\n"), /^config: vms\[0\]: expected a mapping/);
  rejects(() => parseConfigYaml("vms:\n  - [a]\n"), /expected a mapping, got a list/);
  rejects(() => parseConfigYaml("vms: ["), /^config: Flow sequence/);
  rejects(() => parseConfigYaml("vms: []\n---\nvms: []\n"), /multiple documents/);
  rejects(() => parseConfigYaml("vms: [{}]\nvms: [{}]\n"), /Map keys must be unique/);
  rejects(() => parseConfigYaml("? [k]\n: v\n"), /key \(complex\)/);
  rejects(() => parseConfigYaml("1: x\n"), /unknown top-level key 1/);
  rejects(() => parseConfigYaml("vms:\n  - 5: x\n"), /^config: vms\[0\]: key 5 is not a string/);
});

Deno.test("YAML: alias expansion is bounded", () => {
  const levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"];
  for (let i = 1; i < 12; i++) {
    const prev = `*a${i - 1}`;
    levels.push(`a${i}: &a${i} [${Array(10).fill(prev).join(", ")}]`);
  }
  rejects(() => parseConfigYaml(levels.join("\n") + "\nvms: [{}]\n"), /^config: not valid YAML: /);
});

Deno.test("YAML: VM entry errors", () => {
  const entry = (body: string) => () => parseConfigYaml(`vms:\n  - ${body}\n`);
  rejects(entry("forward_cid: 1"), /^config: vms\[0\]: unknown key "forward_cid"/);
  rejects(entry("{guest_cid: 3, guest-cid: 4}"), /^config: vms\[0\]: guest-cid: given twice/);
  rejects(
    entry("guest_cid: 3.5"),
    /^config: vms\[0\]: guest_cid: expected an integer, got the number 3\.5/,
  );
  rejects(entry("guest_cid: 3.0"), /expected an integer/);
  rejects(entry("guest_cid: ~"), /guest_cid: expected an integer, got nothing/);
  rejects(entry("guest_cid: true"), /expected an integer, got true/);
  rejects(entry("guest_cid: 2"), /guest_cid: CID 2 is reserved/);
  rejects(entry("guest_cid: 0xffffffff"), /CID 4294967295 is reserved/);
  rejects(entry("guest_cid: 18446744073709551617"), /out of range 3\.\.4294967294/);
  rejects(entry("guest_cid: -4"), /out of range/);
  rejects(entry("guest_cid: 'abc'"), /"abc" is not a decimal integer/);
  rejects(entry("socket: 123"), /socket: expected a path, got an unsupported value/);
  rejects(entry("socket: [a]"), /socket: expected a path, got a list/);
  rejects(entry("uds_path: ''"), /uds_path: the path is empty/);
  rejects(entry("queue_size: 3"), /queue_size: 3 is not a power of 2/);
  rejects(entry("tx_buffer_size: 0"), /tx_buffer_size: 0 is out of range 1\.\.4294967295/);
  rejects(entry("groups: []"), /groups: no group given/);
  rejects(entry("groups: [a, a]"), /group "a" is listed twice/);
  rejects(entry("groups: [a+b]"), /contains '\+'/);
  rejects(entry("groups: [1]"), /a group name must be a string/);
  rejects(entry("groups: {a: 1}"), /groups: expected group names.*got a mapping/);
  rejects(entry("groups: !!binary aGk="), /groups: expected group names/);
  rejects(
    () => parseConfigYaml("vms:\n  - guest_cid: 4\n  - guest_cid: 4\n"),
    /^VM #2 \(guest CID 4\): guest CID 4 is already used by VM #1/,
  );
  rejects(
    () =>
      parseConfigYaml("vms:\n  - {guest_cid: 4, socket: /x}\n  - {guest_cid: 5, uds_path: /x}\n"),
    /uds-path "\/x" is already the socket of VM #1/,
  );
});

// ---------------------------------------------------------------------------------------------
// --config files

let tempDir: string | undefined;
function scratchDir(): string {
  if (tempDir === undefined) {
    const dir = Deno.makeTempDirSync({ prefix: "vhost-user-vsock-config-test-" });
    globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));
    tempDir = dir;
  }
  return tempDir;
}

function writeConfig(text: string): string {
  const dir = scratchDir();
  const path = `${dir}/c${Math.random().toString(36).slice(2)}.yaml`;
  Deno.writeTextFileSync(path, text);
  return path;
}

Deno.test("--config reads the file; daemon flags still apply", () => {
  const file = writeConfig(README_YAML);
  const cfg = parseArgs(["--config", file, "--max-connections", "10", "--dgram"]);
  assert.deepEqual(cfg.vms, parseConfigYaml(README_YAML));
  assert.equal(cfg.maxConnections, 10);
  assert.equal(cfg.datagrams, true);
  assert.equal(cfg.socketFd, undefined);
});

Deno.test("--config errors name the file", () => {
  const missing = `${scratchDir()}/absent.yaml`;
  rejects(
    () => parseArgs(["--config", missing]),
    /^--config ".*absent\.yaml": cannot read: No such file or directory \(os error 2\)$/,
  );
  rejects(() => parseArgs(["--config", ""]), /^--config: the path is empty/);
  const bad = writeConfig("vms:\n  - guest_cid: 1\n");
  rejects(
    () => parseArgs([`--config=${bad}`]),
    /^--config ".*": config: vms\[0\]: guest_cid: CID 1/,
  );
  rejects(() => parseArgs(["--config", scratchDir()]), /cannot read/); // a directory
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

// ---------------------------------------------------------------------------------------------
// Properties: any input gives a valid configuration or a one-line ConfigError

function outcome(fn: () => VmConfig[], fromFd = false): "ok" | "error" {
  try {
    assertValidVms(fn(), fromFd);
    return "ok";
  } catch (e) {
    if (e instanceof ConfigError && !e.message.includes("\n")) return "error";
    throw e;
  }
}

const keyArb = fc.constantFrom(
  "guest-cid",
  "guest_cid",
  "socket",
  "socket-path",
  "uds-path",
  "uds_path",
  "tx-buffer-size",
  "queue-size",
  "queue_size",
  "groups",
  "group",
  "",
  "__proto__",
);
const valueArb = fc.oneof(
  fc.string(),
  fc.string({ unit: "binary" }),
  fc.nat().map(String),
  fc.constantFrom("0", "2", "3", "4", "1024", "32768", "4294967295", "a+b", "+", "/tmp/x", "="),
);

Deno.test("property: arbitrary --vm specs", () => {
  const seen = { ok: 0, error: 0 };
  fc.assert(
    fc.property(
      fc.oneof(
        fc.string({ unit: "binary" }),
        fc.array(fc.tuple(keyArb, valueArb), { maxLength: 7 })
          .map((items) => items.map(([k, v]) => `${k}=${v}`).join(",")),
      ),
      (spec) => {
        seen[outcome(() => [parseVmSpec(spec)])]++;
      },
    ),
    { numRuns: 2000 },
  );
  assert.ok(seen.ok > 0 && seen.error > 0, JSON.stringify(seen));
});

Deno.test("property: arbitrary command lines", () => {
  const flag = fc.constantFrom(
    ...Object.keys({
      "--guest-cid": 0,
      "--socket": 0,
      "--socket-path": 0,
      "--uds-path": 0,
      "--tx-buffer-size": 0,
      "--queue-size": 0,
      "--groups": 0,
      "--fd": 0,
      "--vm": 0,
      "--log-level": 0,
      "--dgram": 0,
      "--connect-timeout-ms": 0,
      "--max-connections": 0,
      "--": 0,
      "-": 0,
      "--bogus": 0,
    }),
  );
  const arg = fc.oneof(
    flag,
    valueArb,
    fc.tuple(flag, valueArb).map(([f, v]) => `${f}=${v}`),
    fc.tuple(keyArb, valueArb).map(([k, v]) => `${k}=${v}`),
  );
  const seen = { ok: 0, error: 0 };
  fc.assert(
    fc.property(fc.array(arg, { maxLength: 8 }), (argv) => {
      seen[
        outcome(() => {
          const cfg = parseArgs(argv);
          assert.ok(["error", "warn", "info", "debug", "trace"].includes(cfg.logLevel));
          assert.ok(cfg.connectTimeoutMs >= 1 && cfg.maxConnections >= 1);
          return cfg.vms;
        }, argv.some((a) => a.startsWith("--fd")))
      ]++;
    }),
    { numRuns: 3000 },
  );
  assert.ok(seen.ok > 0 && seen.error > 0, JSON.stringify(seen));
});

Deno.test("property: arbitrary YAML text", () => {
  fc.assert(
    fc.property(fc.string({ unit: "binary", maxLength: 200 }), (text) => {
      outcome(() => parseConfigYaml(text));
    }),
    { numRuns: 2000 },
  );
  fc.assert(
    fc.property(fc.anything(), (value) => {
      outcome(() => parseConfigYaml(stringify(value)));
      outcome(() => parseConfigYaml(stringify({ vms: value })));
      outcome(() => parseConfigYaml(stringify({ vms: [value] })));
    }),
    { numRuns: 500 },
  );
});

Deno.test("property: YAML files shaped like configurations", () => {
  const scalar = fc.oneof(
    fc.integer({ min: -1, max: 70000 }),
    fc.constantFrom(0xffffffff, 2 ** 32, 2.5, null, true, "/tmp/a", "/tmp/b", "a+b", "", "x"),
    fc.bigInt({ min: 0n, max: 2n ** 64n }),
    fc.array(fc.constantFrom("a", "b", "", "c+d", 1), { maxLength: 3 }),
    fc.string(),
  );
  const entry = fc.dictionary(keyArb, scalar, { maxKeys: 6 });
  const seen = { ok: 0, error: 0 };
  fc.assert(
    fc.property(fc.array(entry, { maxLength: 4 }), (vms) => {
      seen[outcome(() => parseConfigYaml(stringify({ vms })))]++;
    }),
    { numRuns: 2000 },
  );
  assert.ok(seen.ok > 0 && seen.error > 0, JSON.stringify(seen));
});

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
