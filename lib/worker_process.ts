/**
 * A worker process (`--workers N`): the daemon for a subset of the VMs, supervised by the
 * process that spawned it (`process_supervisor.ts`).
 *
 * Started as `main.ts` with `WORKER_ENV` set (`<control socket> <worker id> <token>`):
 * 1. reads its `WorkerPlan` (JSON) on stdin;
 * 2. connects to the supervisor's private control socket (SOCK_SEQPACKET), says hello, and
 *    receives its fds over SCM_RIGHTS (heartbeat file, doorbell, sibling links, an inherited
 *    `--fd` socket) until `done`;
 * 3. runs today's daemon for its VMs (`supervisor.ts` startDaemon: this thread keeps Deno's
 *    event loop for signals, a Worker thread runs the reactor), with the fds wired in;
 * 4. reports `ready` (or `error` and exits 1); SIGTERM/SIGINT stop it cleanly (sockets
 *    closed, files removed), as does the supervisor going away (control socket EOF).
 */
import {
  close,
  connectUnix,
  pollFds,
  POLLIN,
  recvWithFds,
  sendWithFds,
  setNonBlocking,
  SOCK_SEQPACKET,
} from "../ffi/mod.ts";
import { log } from "./log.ts";
import { startDaemon } from "./supervisor.ts";
import {
  type ControlMessage,
  decodeControl,
  encodeControl,
  type LinkWiring,
  type WiredConfig,
  type WorkerPlan,
  type WorkerWiring,
} from "./worker_plan.ts";

/** How long the supervisor may take to hand over the fds. */
const HANDOVER_TIMEOUT_MS = 10_000;

/** Runs the worker described by `env` (the value of WORKER_ENV); returns the exit status. */
export async function runWorkerProcess(env: string): Promise<number> {
  const [controlPath, id, token] = env.split(" ");
  const plan = JSON.parse(await new Response(Deno.stdin.readable).text()) as WorkerPlan;
  const config = plan.config;
  log.setLevel(config.logLevel);
  log.setPrefix(`[w${plan.worker} cid ${config.vms.map((v) => v.guestCid).join(",")}]`);
  let stopRequested = false;
  let stop = () => {
    stopRequested = true;
  };
  Deno.addSignalListener("SIGINT", () => stop());
  Deno.addSignalListener("SIGTERM", () => stop());

  const ctl = connectUnix(controlPath, { type: SOCK_SEQPACKET, nonblocking: false });
  const send = (m: ControlMessage) => sendWithFds(ctl, encodeControl(m));
  let wiring: WorkerWiring & { listenFd?: number };
  try {
    send({ t: "hello", worker: Number(id), token, pid: Deno.pid });
    wiring = receiveWiring(ctl, plan);
  } catch (e) {
    log.error(`cannot start: ${e instanceof Error ? e.message : e}`);
    return 1;
  }
  setNonBlocking(ctl);
  const wired: WiredConfig = { ...config, worker: wiring };
  if (wiring.listenFd !== undefined) wired.socketFd = wiring.listenFd;
  let daemon;
  try {
    daemon = await startDaemon(wired);
  } catch (e) {
    const message = e instanceof Error ? e.message : String(e);
    send({ t: "error", message });
    log.error(`cannot start: ${message}`);
    return 1;
  }
  send({ t: "ready" });
  stop = () => void daemon.stop();
  if (stopRequested) stop();
  await daemon.stopped;
  return 0;
}

/** Receives the supervisor's fds until `done`. */
function receiveWiring(ctl: number, plan: WorkerPlan): WorkerWiring & { listenFd?: number } {
  const wiring: WorkerWiring & { listenFd?: number } = {
    worker: plan.worker,
    generation: plan.generation,
    controlFd: ctl,
    heartbeatFd: -1,
    heartbeatBytes: 0,
    heartbeatIndex: 0,
    bellFd: -1,
    links: [],
    remotes: plan.remotes,
    stall: plan.stall,
  };
  const buf = new Uint8Array(64 * 1024);
  const deadline = Date.now() + HANDOVER_TIMEOUT_MS;
  for (;;) {
    const left = deadline - Date.now();
    if (left <= 0 || (pollFds([ctl], [POLLIN], left)[0] & POLLIN) === 0) {
      throw new Error("the supervisor did not hand over the worker's fds in time");
    }
    const r = recvWithFds(ctl, buf);
    if (typeof r === "number") throw new Error(`control socket: errno ${-r}`);
    if (r.n === 0) throw new Error("the supervisor closed the control socket");
    const m = decodeControl(buf.subarray(0, r.n));
    const fd = r.fds[0];
    if (m.t === "done") return wiring;
    if (m.t === "heartbeat") {
      wiring.heartbeatFd = fd;
      wiring.heartbeatBytes = m.bytes;
      wiring.heartbeatIndex = m.index;
    } else if (m.t === "bell") wiring.bellFd = fd;
    else if (m.t === "listen") wiring.listenFd = fd;
    else if (m.t === "link") {
      const link: LinkWiring = { ...m, memfd: r.fds[0], peerBellFd: r.fds[1] };
      wiring.links.push(link);
    } else {
      for (const f of r.fds) close(f);
    }
  }
}
