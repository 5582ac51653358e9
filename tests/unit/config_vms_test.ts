/**
 * Tests for lib/config.ts's VM list: --vm specs (keys, aliases, malformed specs), the checks
 * across VMs, YAML configuration files (the vhost-device-vsock example, defaults, structural
 * and entry errors, bounded alias expansion) and --config (reading the file, errors naming it,
 * exclusion of --vm and the single-VM flags).
 */

import assert from "node:assert/strict";
import { parseArgs, parseConfigYaml, parseVmSpec } from "../../lib/config.ts";
import { assertValidVms, rejects, vm } from "./config_fixture.ts";

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
