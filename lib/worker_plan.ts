/**
 * How VMs are spread over worker processes (`--workers N`), and what a worker is handed.
 *
 * - `shardVms`: VM i goes to worker i mod N (a VM's worker never changes across restarts).
 * - `WorkerPlan`: the JSON a worker process reads on its stdin: its VMs (a DaemonConfig), its
 *   id, and the VMs of the other workers (sibling CIDs it may route to).
 * - `WorkerWiring`: the fds it then receives over its control socket (SCM_RIGHTS), as the
 *   numbers they got in the worker process, passed with the config to the reactor thread.
 * - Control messages: one JSON object per SOCK_SEQPACKET message, fds attached where needed.
 */
import type { DaemonConfig, VmConfig } from "./config.ts";

/** One VM served by another worker, as a sibling route. */
export interface RemoteVm {
  cid: number;
  groups: string[];
  worker: number;
}

/** What a worker process reads on its stdin. */
export interface WorkerPlan {
  worker: number;
  /** restarts of this worker so far (0 on the first start) */
  generation: number;
  config: DaemonConfig;
  remotes: RemoteVm[];
  /** test-only fault: block the reactor `ms` milliseconds, `afterMs` after the start */
  stall?: { afterMs: number; ms: number };
}

/** A link to another worker: the memfd holding both rings and the peer's doorbell. */
export interface LinkWiring {
  peer: number;
  memfd: number;
  peerBellFd: number;
  /** ring capacity (data bytes) of each direction */
  capacity: number;
  /** 0: this worker produces into ring 0 and consumes ring 1 (the lower id); 1: reversed */
  side: 0 | 1;
}

/** Everything a worker's reactor gets from the supervisor. */
export interface WorkerWiring {
  worker: number;
  generation: number;
  /** SOCK_SEQPACKET connection to the supervisor (link updates in, EOF = supervisor gone) */
  controlFd: number;
  heartbeatFd: number;
  heartbeatBytes: number;
  /** Int32 index of this worker's heartbeat counter in the heartbeat file */
  heartbeatIndex: number;
  /** eventfd peers write after putting records in a ring towards this worker */
  bellFd: number;
  links: LinkWiring[];
  remotes: RemoteVm[];
  stall?: { afterMs: number; ms: number };
}

/** A DaemonConfig as the reactor thread of a worker process gets it. */
export type WiredConfig = DaemonConfig & { worker?: WorkerWiring };

/** Control messages, supervisor <-> worker. */
export type ControlMessage =
  | { t: "hello"; worker: number; token: string; pid: number }
  | { t: "heartbeat"; bytes: number; index: number } // + heartbeat memfd
  | { t: "bell" } // + own eventfd
  | { t: "listen" } // + the inherited --fd socket
  | { t: "link"; peer: number; capacity: number; side: 0 | 1 } // + memfd, peer's eventfd
  | { t: "link-down"; peer: number }
  | { t: "done" }
  | { t: "ready" }
  | { t: "error"; message: string };

/** Heartbeat counters are one cache line apart. */
export const HEARTBEAT_STRIDE_INTS = 16;
/** Data bytes of each direction of a link between two workers. */
export const SIBLING_RING_CAPACITY = 4 << 20;
/** Environment variable that turns `main.ts` into a worker process: `<control socket> <id>
 * <token>` (the token proves to the supervisor that it spawned this process). */
export const WORKER_ENV = "VHOST_USER_VSOCK_WORKER";
/** Test-only fault: `<cid>:<afterMs>:<ms>` blocks the reactor serving that CID once. */
export const STALL_FAULT_ENV = "VHOST_USER_VSOCK_TEST_STALL";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

export function encodeControl(m: ControlMessage): Uint8Array {
  return encoder.encode(JSON.stringify(m));
}

export function decodeControl(bytes: Uint8Array): ControlMessage {
  return JSON.parse(decoder.decode(bytes)) as ControlMessage;
}

/** VM i -> worker i mod `workers`. */
export function shardVms(vms: readonly VmConfig[], workers: number): VmConfig[][] {
  const shards: VmConfig[][] = Array.from({ length: workers }, () => []);
  vms.forEach((vm, i) => shards[i % workers].push(vm));
  return shards;
}

/** Whether two shards hold VMs that share a group (they need a sibling link). */
export function shardsShareGroup(a: readonly VmConfig[], b: readonly VmConfig[]): boolean {
  return a.some((x) => b.some((y) => x.groups.some((g) => y.groups.includes(g))));
}

/** How a worker names itself in log lines: `worker 1 (CID 4)` / `worker 0 (CIDs 3, 5)`. */
export function workerName(id: number, vms: readonly VmConfig[]): string {
  const cids = vms.map((v) => v.guestCid).join(", ");
  return `worker ${id} (CID${vms.length === 1 ? "" : "s"} ${cids})`;
}
