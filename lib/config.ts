/**
 * Command line and configuration file of the daemon.
 *
 * The flags are those of rust-vmm's `vhost-device-vsock` (so existing scripts keep working),
 * plus the vhost-user "Backend program conventions" of QEMU's `docs/interop/vhost-user.rst`
 * (`--socket-path`, `--fd`, `--print-capabilities`) and a few daemon-wide knobs.
 *
 * Three ways to describe the VMs, mutually exclusive as in vhost-device-vsock:
 *
 * - single-VM flags: `--guest-cid`, `--socket`/`--socket-path` or `--fd`, `--uds-path`,
 *   `--tx-buffer-size`, `--queue-size`, `--groups`. All have defaults, so the daemon runs
 *   with no flags at all (CID 3 on `/tmp/vhost3.socket`, host side on `/tmp/vm3.vsock`).
 * - `--vm key=value,...`, repeatable, one VM each. Keys: `guest-cid`, `socket`, `uds-path`,
 *   `tx-buffer-size`, `queue-size`, `groups` (each also spelled with `_`; `socket-path` is an
 *   alias of `socket`). Values cannot contain `,`.
 * - `--config FILE`: YAML, a top-level `vms:` sequence of mappings with the same keys
 *   (`guest_cid: 3`, `socket: /tmp/vhost3.socket`, `groups: a+b` or `groups: [a, b]`).
 *
 * Groups are `+`-separated names; VMs of one daemon that share a group can reach each other
 * by CID (sibling communication). Everything is validated up front and every problem is a
 * {@link ConfigError} with a one-line message naming the flag or key at fault: reserved or
 * out-of-range CIDs (0, 1, 2 and 0xffffffff are not guest CIDs), the same CID or Unix socket
 * path used twice, unknown keys, malformed numbers, queue sizes that are not a power of two
 * no larger than 32768 (the split-virtqueue limit), paths that do not fit `sun_path`.
 *
 * Differences from vhost-device-vsock 0.3: no flag is required (it needs `--socket` and
 * `--uds-path`, or `socket`/`uds_path` in every `--vm` and YAML entry); CIDs, queue sizes,
 * buffer sizes, paths and groups are validated (it accepts CID 2, queue size 1000, a 0-byte
 * buffer); unknown YAML keys, repeated keys and repeated flags are errors (it ignores or
 * overrides them); `groups:` may also be a YAML list. Its `--forward-cid`/`--forward-listen`
 * (AF_VSOCK host side) are not supported.
 */

import { parseArgs as parseNodeArgs } from "node:util";
import { parseDocument } from "yaml";
import denoJson from "../deno.json" with { type: "json" };
import {
  CONNECT_TIMEOUT_MS,
  MAX_CONNECTIONS,
  VMADDR_CID_ANY,
  VMADDR_CID_HYPERVISOR,
  VMADDR_CID_LOCAL,
  VSOCK_HOST_CID,
} from "./vsock/constants.ts";

/** One virtio-vsock device: the VM it serves and its host side. */
export interface VmConfig {
  /** guest context id, written to the device config space (`le64 guest_cid`) */
  guestCid: number;
  /** vhost-user control socket the daemon listens on ("" when the socket comes from `--fd`) */
  socket: string;
  /** hybrid-vsock Unix socket for host applications; guest connects go to `<udsPath>_<port>` */
  udsPath: string;
  /** per-connection buffer for guest->host data; advertised to the guest as `buf_alloc` */
  txBufferSize: number;
  /** largest virtqueue size the device accepts (power of two, <= 32768) */
  queueSize: number;
  /** sibling groups; never empty, no duplicates */
  groups: string[];
}

export type LogLevel = "error" | "warn" | "info" | "debug" | "trace";

export interface DaemonConfig {
  vms: VmConfig[];
  logLevel: LogLevel;
  /** `--fd`: inherited vhost-user socket (listening or connected); then `vms[0].socket` is "" */
  socketFd?: number;
  /** `--print-capabilities`: print {@link capabilitiesJson} and exit; other flags are ignored */
  printCapabilities: boolean;
  /** `--help`: print {@link USAGE} and exit */
  printHelp?: boolean;
  /** `--version`: print {@link VERSION} and exit */
  printVersion?: boolean;
  /** `--dgram`: offer VIRTIO_VSOCK_F_DGRAM (feature bit 3); off by default */
  datagrams: boolean;
  /** `--poll-us N`: busy-poll this long after activity before sleeping (0 = off) */
  pollUs?: number;
  /** `--no-autotune`: keep every receive window at `--tx-buffer-size` */
  noAutotune?: boolean;
  /** `--max-buffer-memory N`: bytes of grown receive windows per VM */
  maxBufferMemory?: number;
  /** `--rx-weight PORT=N` (repeatable): RX scheduler weight of flows toward guest port PORT */
  rxWeights: [port: number, weight: number][];
  /** how long a host `CONNECT <port>` waits for the guest's answer */
  connectTimeoutMs: number;
  /** open connections per VM before new ones are refused */
  maxConnections: number;
  /**
   * `--workers N` (YAML `workers:`): VMs are sharded over N supervised worker processes;
   * 0 serves every VM in this process (no crash isolation). Unset: {@link defaultWorkerCount}.
   * Only the command-line daemon (`main.ts`) honours it; `startDaemon` always runs in-process.
   */
  workers?: number;
  /** `--watchdog-ms`: a worker whose reactor has not come back to epoll_wait for this long is
   * reported (default {@link DEFAULT_WATCHDOG_MS}) */
  watchdogMs?: number;
  /** `--watchdog-restart`: a worker the watchdog reports is also killed and restarted */
  watchdogRestart?: boolean;
}

/** Bad command line or configuration file; `message` is one line, fit for stderr. */
export class ConfigError extends Error {
  override name = "ConfigError";
}

export const VERSION: string = denoJson.version;

/** Lowest and highest CIDs a guest may have (the config field's upper 32 bits are reserved;
 * the reserved CIDs are in `vsock/constants.ts`). */
const GUEST_CID_MIN = VSOCK_HOST_CID + 1;
const GUEST_CID_MAX = VMADDR_CID_ANY - 1;

/** Split virtqueues: Queue Size is a power of 2, at most 32768. */
export const VIRTQUEUE_MAX_SIZE = 32768;
/** `struct sockaddr_un.sun_path` holds 108 bytes including the terminating NUL. */
export const SUN_PATH_MAX = 108;
/** The first inherited fd: 0, 1 and 2 are stdin/stdout/stderr (vhost-user.rst conventions). */
export const FIRST_INHERITED_FD = 3;
const FD_MAX = 0x7fffffff;
const U32_MAX = 0xffffffff;
/** Upper bounds for daemon knobs: a timer a day away, and the usual hard RLIMIT_NOFILE. */
const CONNECT_TIMEOUT_MS_MAX = 86_400_000;
const MAX_CONNECTIONS_LIMIT = 1 << 20;
/** Largest `--poll-us`: 10 ms of spinning after each burst of activity. */
const POLL_US_MAX = 10_000;
/** Largest `--rx-weight`: a flow may get at most 64 times the default share. */
const RX_WEIGHT_MAX = 64;

export const DEFAULT_GUEST_CID = 3;
export const DEFAULT_TX_BUFFER_SIZE = 64 * 1024;
export const DEFAULT_QUEUE_SIZE = 1024;
export const DEFAULT_GROUP = "default";
export const DEFAULT_LOG_LEVEL: LogLevel = "info";
/** Firecracker's connect timeout and connection cap (`devices/virtio/vsock/unix/defs.rs`). */
export const DEFAULT_CONNECT_TIMEOUT_MS = CONNECT_TIMEOUT_MS;
export const DEFAULT_MAX_CONNECTIONS = MAX_CONNECTIONS;
/** Default `--watchdog-ms`: a reactor busy this long without returning to epoll_wait is stuck. */
export const DEFAULT_WATCHDOG_MS = 5000;
/** Most worker processes `--workers` may ask for. */
export const MAX_WORKERS = 256;
const WATCHDOG_MS_MIN = 100;

/** Default `--workers`: one per VM, at most one per CPU (so one VM gets one worker). */
export function defaultWorkerCount(vmCount: number, cpus = navigator.hardwareConcurrency): number {
  return Math.max(1, Math.min(vmCount, cpus, MAX_WORKERS));
}

/** Separator of group names in `--groups`, `groups=` and YAML `groups:` strings. */
export const GROUP_SEPARATOR = "+";

/** Default vhost-user socket of a guest (the naming of vhost-device-vsock's examples). */
export function defaultSocketPath(guestCid: number): string {
  return `/tmp/vhost${guestCid}.socket`;
}

/** Default hybrid-vsock socket of a guest. */
export function defaultUdsPath(guestCid: number): string {
  return `/tmp/vm${guestCid}.vsock`;
}

const LOG_LEVELS: readonly LogLevel[] = ["error", "warn", "info", "debug", "trace"];

export const USAGE: string = `vhost-user-vsock ${VERSION}: virtio-vsock device backend (vhost-user)

Usage:
  vhost-user-vsock [--guest-cid N] [--socket PATH | --fd FD] [--uds-path PATH] [OPTIONS]
  vhost-user-vsock --vm KEY=VALUE,... [--vm KEY=VALUE,...]... [OPTIONS]
  vhost-user-vsock --config FILE [OPTIONS]

One VM (cannot be combined with --vm or --config):
  --guest-cid N           guest context id, 3..4294967294 (default: 3)
  --socket PATH           vhost-user socket to listen on (default: /tmp/vhost<guest-cid>.socket)
  --socket-path PATH      same as --socket (vhost-user backend convention)
  --fd FD                 inherited vhost-user socket, listening or connected; excludes --socket
                          (default: none)
  --uds-path PATH         Unix socket for host applications ("CONNECT <port>\\n"); guest
                          connects to host port P go to PATH_P (default: /tmp/vm<guest-cid>.vsock).
                          Socket types: stream on PATH and PATH_P; seqpacket on PATH.seqpacket
                          and PATH_P (SOCK_SEQPACKET); datagrams (--dgram) on PATH.dgram and
                          PATH_P.dgram, each starting with a "<guest-port>\\n" line
  --tx-buffer-size BYTES  per-connection guest->host buffer, 1..4294967295 (default: 65536)
  --queue-size N          largest virtqueue, a power of 2 up to 32768 (default: 1024)
  --groups NAME[+NAME]    sibling groups: VMs sharing one reach each other (default: default)

Several VMs:
  --vm SPEC               one VM per --vm, repeatable. SPEC is comma-separated KEY=VALUE with
                          keys guest-cid, socket, uds-path, tx-buffer-size, queue-size, groups
                          (also spelled with '_'); defaults as above. Example:
                          --vm guest-cid=4,socket=/tmp/vhost4.socket,groups=group1+group2
  --config FILE           YAML file with a "vms:" list of the same keys (excludes --vm), e.g.
                          vms:
                            - guest_cid: 4
                              socket: /tmp/vhost4.socket
                              uds_path: /tmp/vm4.vsock
                              groups: group1+group2

Daemon:
  --log-level LEVEL       error, warn, info, debug or trace (default: info)
  --dgram                 offer datagram sockets (VIRTIO_VSOCK_F_DGRAM, feature bit 3; not in
                          the virtio spec) on <uds-path>.dgram (default: off)
  --poll-us N             after activity, poll for up to N microseconds before sleeping:
                          lower latency for a spinning CPU (0..10000; default: 0, off)
  --no-autotune           keep each connection's receive window at --tx-buffer-size (default:
                          windows grow up to 4 MiB while the host app keeps up)
  --max-buffer-memory N   bytes of grown receive windows per VM (default: 268435456)
  --rx-weight PORT=N      share of the guest's rx queue for flows to guest port PORT, N times
                          the default (1..64; repeatable; default: every flow weighs 1)
  --connect-timeout-ms MS how long a host CONNECT waits for the guest to answer (default: 2000)
  --max-connections N     open connections per VM (default: 1023)
  --workers N             serve the VMs from N supervised worker processes (a crashed one is
                          restarted); 0 serves them all in this process (default: one per VM,
                          at most one per CPU); also "workers:" in the --config file
  --watchdog-ms MS        report a worker whose reactor is stuck this long (default: 5000)
  --watchdog-restart      also kill and restart such a worker (default: off)
  --print-capabilities    print the vhost-user backend capabilities as JSON and exit
  -h, --help              print this help and exit
  -V, --version           print the version and exit
`;

// ---------------------------------------------------------------------------------------------
// Values

/** Quote a user-supplied string for an error message: escaped (one line) and bounded. */
function show(value: string, limit = 60): string {
  return JSON.stringify(value.length > limit ? value.slice(0, limit) + "..." : value);
}

function fail(where: string, problem: string): never {
  throw new ConfigError(`${where}: ${problem}`);
}

const DECIMAL = /^[0-9]+$/;

/** A decimal integer in [min, max] (surrounding blanks allowed), from a flag, `--vm` or YAML. */
function decimal(raw: string, where: string, min: number, max: number): number {
  const text = raw.trim();
  if (!DECIMAL.test(text)) fail(where, `${show(text)} is not a decimal integer`);
  const value = text.length > 16 ? Infinity : Number(text);
  if (value < min || value > max) fail(where, `${show(text)} is out of range ${min}..${max}`);
  return value;
}

/** A YAML scalar as an integer in [min, max]: an int (a BigInt, see intAsBigInt) or digits. */
function integer(value: unknown, where: string, min: number, max: number): number {
  if (typeof value === "string") return decimal(value, where, min, max);
  if (typeof value !== "bigint") fail(where, `expected an integer, got ${describe(value)}`);
  if (value < BigInt(min) || value > BigInt(max)) {
    fail(where, `${value} is out of range ${min}..${max}`);
  }
  return Number(value);
}

function describe(value: unknown): string {
  if (value === null || value === undefined) return "nothing";
  if (typeof value === "number") return `the number ${value}`;
  if (typeof value === "string") return `the string ${show(value)}`;
  if (typeof value === "boolean") return String(value);
  if (Array.isArray(value)) return "a list";
  if (value instanceof Map) return "a mapping";
  return "an unsupported value";
}

/** The CIDs no guest may have, with their `<linux/vm_sockets.h>` names. */
const RESERVED_CIDS: ReadonlyMap<number, string> = new Map([
  [VMADDR_CID_HYPERVISOR, "VMADDR_CID_HYPERVISOR"],
  [VMADDR_CID_LOCAL, "VMADDR_CID_LOCAL"],
  [VSOCK_HOST_CID, "VMADDR_CID_HOST, the host"],
  [VMADDR_CID_ANY, "VMADDR_CID_ANY"],
]);

function guestCid(value: unknown, where: string): number {
  const digits = typeof value === "string" ? value.trim() : "";
  const n = typeof value === "bigint" ? value : DECIMAL.test(digits) ? BigInt(digits) : -1n;
  const reserved = n >= 0n && n <= BigInt(U32_MAX) ? RESERVED_CIDS.get(Number(n)) : undefined;
  if (reserved !== undefined) fail(where, `CID ${n} is reserved (${reserved})`);
  return integer(value, where, GUEST_CID_MIN, GUEST_CID_MAX);
}

function queueSize(value: unknown, where: string): number {
  const n = integer(value, where, 1, VIRTQUEUE_MAX_SIZE);
  if ((n & (n - 1)) !== 0) fail(where, `${n} is not a power of 2`);
  return n;
}

function txBufferSize(value: unknown, where: string): number {
  return integer(value, where, 1, U32_MAX);
}

const encoder = new TextEncoder();

/** A Unix socket path: non-empty, no NUL, fits `sun_path` with its terminating NUL. */
function socketPath(value: unknown, where: string): string {
  if (typeof value !== "string") fail(where, `expected a path, got ${describe(value)}`);
  if (value === "") fail(where, "the path is empty");
  if (value.includes("\0")) fail(where, "the path contains a NUL byte");
  if (encoder.encode(value).length >= SUN_PATH_MAX) {
    fail(where, `${show(value)} is longer than ${SUN_PATH_MAX - 1} bytes (sun_path)`);
  }
  return value;
}

/** Group names from `a+b` or (YAML) a sequence of names. */
function groupList(value: unknown, where: string): string[] {
  let names: unknown[];
  if (typeof value === "string") names = value.split(GROUP_SEPARATOR);
  else if (Array.isArray(value)) names = value;
  else fail(where, `expected group names separated by '+', got ${describe(value)}`);
  if (names.length === 0) fail(where, "no group given");
  const groups: string[] = [];
  for (const raw of names) {
    if (typeof raw !== "string") fail(where, `a group name must be a string, not ${describe(raw)}`);
    const name = raw.trim();
    if (name === "") fail(where, `empty group name in ${show(String(value))}`);
    if (name.includes(GROUP_SEPARATOR) || name.includes(",")) {
      fail(where, `group name ${show(name)} contains '+' or ','`);
    }
    if (groups.includes(name)) fail(where, `group ${show(name)} is listed twice`);
    groups.push(name);
  }
  return groups;
}

// ---------------------------------------------------------------------------------------------
// One VM: --vm specs and YAML entries share the keys and the checks

type VmField = keyof VmConfig;

/** Accepted key spellings -> field (a Map: no prototype keys such as "constructor"). */
const VM_KEYS: ReadonlyMap<string, VmField> = new Map<string, VmField>([
  ["guest-cid", "guestCid"],
  ["guest_cid", "guestCid"],
  ["socket", "socket"],
  ["socket-path", "socket"],
  ["socket_path", "socket"],
  ["uds-path", "udsPath"],
  ["uds_path", "udsPath"],
  ["tx-buffer-size", "txBufferSize"],
  ["tx_buffer_size", "txBufferSize"],
  ["queue-size", "queueSize"],
  ["queue_size", "queueSize"],
  ["groups", "groups"],
]);

const VM_KEY_LIST = "guest-cid, socket, uds-path, tx-buffer-size, queue-size, groups";

/** Raw values of one VM, each with the name to blame in an error. */
type VmValues = Map<VmField, { value: unknown; where: string }>;

function addVmValue(values: VmValues, key: string, value: unknown, context: string): void {
  const field = VM_KEYS.get(key);
  if (field === undefined) fail(context, `unknown key ${show(key)} (known: ${VM_KEY_LIST})`);
  const where = `${context}: ${key}`;
  const previous = values.get(field);
  if (previous !== undefined) fail(where, `given twice (already as ${previous.where})`);
  values.set(field, { value, where });
}

/**
 * Validate the raw values of one VM and fill in the defaults. With `inheritedSocket` (`--fd`)
 * the vhost-user socket is not bound to a path and `socket` is "".
 */
function buildVm(values: VmValues, inheritedSocket = false): VmConfig {
  const get = (field: VmField) => values.get(field);
  const cid = get("guestCid");
  const guest = cid === undefined ? DEFAULT_GUEST_CID : guestCid(cid.value, cid.where);
  const socket = get("socket");
  const uds = get("udsPath");
  const tx = get("txBufferSize");
  const queue = get("queueSize");
  const groups = get("groups");
  const vm: VmConfig = {
    guestCid: guest,
    socket: inheritedSocket
      ? ""
      : socket === undefined
      ? defaultSocketPath(guest)
      : socketPath(socket.value, socket.where),
    udsPath: uds === undefined ? defaultUdsPath(guest) : socketPath(uds.value, uds.where),
    txBufferSize: tx === undefined ? DEFAULT_TX_BUFFER_SIZE : txBufferSize(tx.value, tx.where),
    queueSize: queue === undefined ? DEFAULT_QUEUE_SIZE : queueSize(queue.value, queue.where),
    groups: groups === undefined ? [DEFAULT_GROUP] : groupList(groups.value, groups.where),
  };
  if (vm.socket === vm.udsPath) {
    fail((uds ?? socket)?.where ?? "VM", `${show(vm.udsPath)} is both the socket and the uds-path`);
  }
  return vm;
}

/**
 * One `--vm` value: comma-separated `key=value` items, e.g.
 * `guest-cid=3,socket=/tmp/vhost3.socket,uds-path=/tmp/vm3.vsock,groups=group1+groupA`.
 * Keys and values are trimmed; a value is everything after the first `=`.
 */
export function parseVmSpec(spec: string): VmConfig {
  const context = `--vm ${show(spec)}`;
  const body = spec.trim();
  if (body === "") fail("--vm", "empty VM specification");
  const values: VmValues = new Map();
  for (const item of body.split(",")) {
    const eq = item.indexOf("=");
    if (item.trim() === "") fail(context, "empty item (stray ',')");
    if (eq < 0) fail(context, `${show(item.trim())} is not key=value`);
    const key = item.slice(0, eq).trim();
    const value = item.slice(eq + 1).trim();
    addVmValue(values, key, value, context);
  }
  return buildVm(values);
}

// ---------------------------------------------------------------------------------------------
// YAML

/** Aliases are expanded by toJS; bound them (and so the work a small file can cause). */
const YAML_MAX_ALIAS_COUNT = 100;

/**
 * The VMs of a YAML configuration file: a mapping whose only key is `vms`, a non-empty
 * sequence of mappings with the `--vm` keys (vhost-device-vsock writes them with `_`).
 * Cross-VM checks (CIDs and paths used twice) are applied.
 */
export function parseConfigYaml(text: string): VmConfig[] {
  return parseConfigDocument(text).vms;
}

/** What a configuration file holds: the VMs and, optionally, `workers:`. */
export interface ConfigDocument {
  vms: VmConfig[];
  workers?: number;
}

/** The VMs and daemon keys (`workers:`) of a YAML configuration file. */
export function parseConfigDocument(text: string): ConfigDocument {
  let root: unknown;
  try {
    const doc = parseDocument(text, { intAsBigInt: true, uniqueKeys: true, prettyErrors: true });
    if (doc.errors.length > 0) fail("config", firstLine(doc.errors[0].message));
    root = doc.toJS({ mapAsMap: true, maxAliasCount: YAML_MAX_ALIAS_COUNT });
  } catch (e) {
    if (e instanceof ConfigError) throw e;
    fail("config", `not valid YAML: ${firstLine(e instanceof Error ? e.message : String(e))}`);
  }
  if (root === null || root === undefined) fail("config", "the file is empty (expected vms:)");
  if (!(root instanceof Map)) fail("config", `expected a mapping with vms:, got ${describe(root)}`);
  for (const key of root.keys()) {
    if (key !== "vms" && key !== "workers") {
      fail("config", `unknown top-level key ${showKey(key)} (expected vms or workers)`);
    }
  }
  const list: unknown = root.get("vms");
  if (!Array.isArray(list)) fail("config: vms", `expected a list of VMs, got ${describe(list)}`);
  if (list.length === 0) fail("config: vms", "the list is empty");
  const vms = list.map((entry: unknown, i: number) => {
    const context = `config: vms[${i}]`;
    if (!(entry instanceof Map)) fail(context, `expected a mapping, got ${describe(entry)}`);
    const values: VmValues = new Map();
    for (const [key, value] of entry) {
      if (typeof key !== "string") fail(context, `key ${showKey(key)} is not a string`);
      addVmValue(values, key, value, context);
    }
    return buildVm(values);
  });
  checkDistinct(vms);
  const workers = root.get("workers");
  if (workers === undefined) return { vms };
  return { vms, workers: integer(workers, "config: workers", 0, MAX_WORKERS) };
}

function firstLine(message: string): string {
  const line = message.split("\n")[0].trim();
  return line.endsWith(":") ? line.slice(0, -1) : line;
}

function showKey(key: unknown): string {
  return typeof key === "string" ? show(key) : typeof key === "bigint" ? String(key) : "(complex)";
}

// ---------------------------------------------------------------------------------------------
// Across VMs

/** No two VMs share a CID; no Unix socket path is used twice (as socket or uds path). */
function checkDistinct(vms: readonly VmConfig[]): void {
  const cids = new Map<number, number>();
  const paths = new Map<string, string>();
  vms.forEach((vm, i) => {
    const where = vms.length > 1 ? `VM #${i + 1} (guest CID ${vm.guestCid})` : "VM";
    const other = cids.get(vm.guestCid);
    if (other !== undefined) {
      fail(where, `guest CID ${vm.guestCid} is already used by VM #${other + 1}`);
    }
    cids.set(vm.guestCid, i);
    for (const [path, role] of [[vm.socket, "socket"], [vm.udsPath, "uds-path"]] as const) {
      if (path === "") continue; // the socket comes from --fd
      const user = paths.get(path);
      if (user !== undefined) fail(where, `${role} ${show(path)} is already the ${user}`);
      paths.set(path, `${role} of ${where}`);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Command line

const OPTIONS = {
  "guest-cid": { type: "string" },
  "socket": { type: "string" },
  "socket-path": { type: "string" },
  "uds-path": { type: "string" },
  "tx-buffer-size": { type: "string" },
  "queue-size": { type: "string" },
  "groups": { type: "string" },
  "fd": { type: "string" },
  "vm": { type: "string", multiple: true },
  "config": { type: "string" },
  "log-level": { type: "string" },
  "dgram": { type: "boolean" },
  "rx-weight": { type: "string", multiple: true },
  "no-autotune": { type: "boolean" },
  "poll-us": { type: "string" },
  "max-buffer-memory": { type: "string" },
  "connect-timeout-ms": { type: "string" },
  "max-connections": { type: "string" },
  "workers": { type: "string" },
  "watchdog-ms": { type: "string" },
  "watchdog-restart": { type: "boolean" },
  "print-capabilities": { type: "boolean" },
  "help": { type: "boolean", short: "h" },
  "version": { type: "boolean", short: "V" },
} as const;

/** Flags that describe the one VM of the single-VM form. */
const SINGLE_VM_FLAGS = [
  "guest-cid",
  "socket",
  "socket-path",
  "uds-path",
  "tx-buffer-size",
  "queue-size",
  "groups",
  "fd",
] as const;

/** The defaults: one VM with CID 3, no flags given. */
export function defaultDaemonConfig(): DaemonConfig {
  return {
    vms: [buildVm(new Map())],
    logLevel: DEFAULT_LOG_LEVEL,
    printCapabilities: false,
    datagrams: false,
    rxWeights: [],
    connectTimeoutMs: DEFAULT_CONNECT_TIMEOUT_MS,
    maxConnections: DEFAULT_MAX_CONNECTIONS,
  };
}

/**
 * The daemon configuration from the command line (without the program name). `--config`
 * reads the named file. `--print-capabilities`, `--help` and `--version` win over everything
 * else on the line, which is then not checked (vhost-user.rst: "Other options and arguments
 * should be ignored").
 */
export function parseArgs(argv: string[]): DaemonConfig {
  const end = argv.indexOf("--");
  const flags = end < 0 ? argv : argv.slice(0, end);
  if (flags.includes("--print-capabilities")) {
    return { ...defaultDaemonConfig(), printCapabilities: true };
  }
  if (flags.includes("--help") || flags.includes("-h")) {
    return { ...defaultDaemonConfig(), printHelp: true };
  }
  if (flags.includes("--version") || flags.includes("-V")) {
    return { ...defaultDaemonConfig(), printVersion: true };
  }

  const { values, tokens } = strictParse(argv);
  const count = new Map<string, number>();
  for (const token of tokens) {
    if (token.kind !== "option") continue;
    const n = (count.get(token.name) ?? 0) + 1;
    count.set(token.name, n);
    if (n > 1 && token.name !== "vm" && token.name !== "rx-weight") {
      fail(`--${token.name}`, "given more than once");
    }
  }
  if (values.socket !== undefined && values["socket-path"] !== undefined) {
    fail("--socket-path", "is the same option as --socket; give only one");
  }
  if (values.fd !== undefined && (values.socket ?? values["socket-path"]) !== undefined) {
    fail(
      "--fd",
      `cannot be combined with --${values.socket !== undefined ? "socket" : "socket-path"}`,
    );
  }
  const multi = values.vm !== undefined ? "--vm" : values.config !== undefined ? "--config" : "";
  if (values.vm !== undefined && values.config !== undefined) {
    fail("--config", "cannot be combined with --vm");
  }
  if (multi !== "") {
    for (const flag of SINGLE_VM_FLAGS) {
      if (values[flag] !== undefined) {
        fail(`--${flag}`, `cannot be combined with ${multi} (describe the VM there instead)`);
      }
    }
  }

  const config = defaultDaemonConfig();
  if (values.vm !== undefined) {
    config.vms = values.vm.map(parseVmSpec);
    checkDistinct(config.vms);
  } else if (values.config !== undefined) {
    const file = readConfigFile(values.config);
    config.vms = file.vms;
    if (file.workers !== undefined) config.workers = file.workers;
  } else {
    const single: VmValues = new Map();
    for (const flag of SINGLE_VM_FLAGS) {
      const value = values[flag];
      const field = VM_KEYS.get(flag);
      if (field !== undefined && value !== undefined) {
        single.set(field, { value, where: `--${flag}` });
      }
    }
    if (values.fd !== undefined) {
      config.socketFd = decimal(values.fd, "--fd", FIRST_INHERITED_FD, FD_MAX);
    }
    config.vms = [buildVm(single, values.fd !== undefined)];
    checkDistinct(config.vms);
  }

  if (values["log-level"] !== undefined) config.logLevel = logLevel(values["log-level"]);
  config.datagrams = values.dgram === true;
  if (values["no-autotune"] === true) config.noAutotune = true;
  if (values["poll-us"] !== undefined) {
    config.pollUs = decimal(values["poll-us"], "--poll-us", 0, POLL_US_MAX);
  }
  if (values["max-buffer-memory"] !== undefined) {
    config.maxBufferMemory = decimal(
      values["max-buffer-memory"],
      "--max-buffer-memory",
      0,
      2 ** 40,
    );
  }
  for (const spec of values["rx-weight"] ?? []) {
    const eq = spec.indexOf("=");
    if (eq < 0) fail("--rx-weight", `${show(spec)} is not PORT=N`);
    const port = decimal(spec.slice(0, eq), "--rx-weight", 0, U32_MAX);
    const weight = decimal(spec.slice(eq + 1), "--rx-weight", 1, RX_WEIGHT_MAX);
    config.rxWeights = [...config.rxWeights.filter(([p]) => p !== port), [port, weight]];
  }
  if (values["connect-timeout-ms"] !== undefined) {
    config.connectTimeoutMs = decimal(
      values["connect-timeout-ms"],
      "--connect-timeout-ms",
      1,
      CONNECT_TIMEOUT_MS_MAX,
    );
  }
  if (values["max-connections"] !== undefined) {
    config.maxConnections = decimal(
      values["max-connections"],
      "--max-connections",
      1,
      MAX_CONNECTIONS_LIMIT,
    );
  }
  if (values.workers !== undefined) {
    config.workers = decimal(values.workers, "--workers", 0, MAX_WORKERS);
  }
  if (values["watchdog-ms"] !== undefined) {
    config.watchdogMs = decimal(
      values["watchdog-ms"],
      "--watchdog-ms",
      WATCHDOG_MS_MIN,
      CONNECT_TIMEOUT_MS_MAX,
    );
  }
  if (values["watchdog-restart"] === true) config.watchdogRestart = true;
  return config;
}

function logLevel(text: string): LogLevel {
  const level = LOG_LEVELS.find((l) => l === text.toLowerCase());
  if (level === undefined) {
    fail("--log-level", `${show(text)} is not one of ${LOG_LEVELS.join(", ")}`);
  }
  return level;
}

function readConfigFile(path: string): ConfigDocument {
  const where = `--config ${show(path, 4096)}`;
  if (path === "") fail("--config", "the path is empty");
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (e) {
    const reason = firstLine(e instanceof Error ? e.message : String(e));
    fail(where, `cannot read: ${reason.replace(/: readfile .*$/, "")}`);
  }
  try {
    return parseConfigDocument(text);
  } catch (e) {
    if (e instanceof ConfigError) throw new ConfigError(`${where}: ${e.message}`);
    throw e;
  }
}

function strictParse(argv: string[]) {
  try {
    return parseNodeArgs({
      args: argv,
      options: OPTIONS,
      strict: true,
      allowPositionals: false,
      tokens: true,
    });
  } catch (e) {
    throw new ConfigError(nodeParseMessage(e));
  }
}

/** node:util parseArgs reports TypeErrors with a code and a multi-line message. */
function nodeParseMessage(e: unknown): string {
  const code = (e as { code?: unknown })?.code;
  const message = firstLine(e instanceof Error ? e.message : String(e));
  if (code === "ERR_PARSE_ARGS_INVALID_OPTION_VALUE" && message.includes("ambiguous")) {
    return `${message} For a value starting with '-', write --option=VALUE`;
  }
  return message; // the command line adds "(try --help)" once
}
