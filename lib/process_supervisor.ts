/**
 * The process supervisor (`--workers N`, N >= 1): VMs sharded over N worker processes, so
 * that a fault killing one process (SIGBUS when a front end truncates guest memory under the
 * mapping, an out-of-memory kill, a bug) or stalling one reactor leaves the others running.
 *
 * - Spawning: each worker is this same program (`Deno.execPath()` + the main module, or the
 *   compiled binary alone) with `WORKER_ENV` set; it reads its plan (JSON) on stdin, then
 *   connects to the supervisor's private control socket (SOCK_SEQPACKET in a 0700 temporary
 *   directory) and receives its fds with SCM_RIGHTS (Deno.Command cannot pass extra fds):
 *   the heartbeat file, its doorbell eventfd, one memfd per sibling link, an inherited `--fd`.
 * - Restarts: when a worker dies the supervisor logs one line naming its VMs and why (signal
 *   or exit status), tells its sibling peers the link is down, and starts it again at once
 *   (its sockets are re-created: `listenUnix` replaces the stale files); a worker that keeps
 *   dying within CRASH_LOOP_WINDOW_MS of its start is restarted after a doubling delay, up to
 *   RESTART_DELAY_MAX_MS. The kernel closed the dead worker's host sockets (host apps see EOF).
 * - Watchdog: every worker's reactor bumps a counter in a shared memfd around epoll_wait; a
 *   reactor that has not come back for `--watchdog-ms` is reported (one line naming its VMs)
 *   and, with `--watchdog-restart`, killed (SIGKILL) and restarted.
 * - Stopping: SIGTERM/SIGINT (via `stop()`) send SIGTERM to every worker, wait for them
 *   (SIGKILL after STOP_GRACE_MS), remove every socket file they may have left, and resolve.
 */
import {
  acceptRaw,
  close,
  eventFd,
  getSockOptInt,
  type Mapping,
  mapShared,
  memfdCreate,
  pollFdsAsync,
  POLLIN,
  recvWithFds,
  sendWithFds,
  SO_ACCEPTCONN,
  SOCK_SEQPACKET,
  unmap,
} from "../ffi/mod.ts";
import { listenUnix } from "../ffi/mod.ts";
import {
  type DaemonConfig,
  DEFAULT_WATCHDOG_MS,
  defaultWorkerCount,
  type VmConfig,
} from "./config.ts";
import { log } from "./log.ts";
import { ringBytes } from "./sibling_ring.ts";
import type { RunningDaemon } from "./supervisor.ts";
import { HeartbeatWatch } from "./watchdog.ts";
import {
  type ControlMessage,
  decodeControl,
  encodeControl,
  HEARTBEAT_STRIDE_INTS,
  shardsShareGroup,
  shardVms,
  SIBLING_RING_CAPACITY,
  STALL_FAULT_ENV,
  WORKER_ENV,
  workerName,
  type WorkerPlan,
} from "./worker_plan.ts";

/** A worker that dies within this long of its start counts as crash-looping. */
export const CRASH_LOOP_WINDOW_MS = 10_000;
/** First delay before restarting a crash-looping worker; doubles each time. */
export const RESTART_DELAY_MIN_MS = 100;
export const RESTART_DELAY_MAX_MS = 10_000;
/** How long workers get to stop after SIGTERM before SIGKILL. */
export const STOP_GRACE_MS = 5000;
/** How long a started worker may take to connect and report ready. */
const START_TIMEOUT_MS = 30_000;
const CONTROL_MESSAGE_MAX = 64 * 1024;

/** The delay before restart number `crashes` in a row (0 for the first). */
export function restartDelayMs(crashes: number): number {
  if (crashes <= 1) return 0;
  return Math.min(RESTART_DELAY_MAX_MS, RESTART_DELAY_MIN_MS * 2 ** (crashes - 2));
}

/** "killed by SIGBUS (exit 135)" / "exited with status 1". */
export function describeExit(status: Deno.CommandStatus): string {
  return status.signal !== null
    ? `killed by ${status.signal} (exit ${status.code})`
    : `exited with status ${status.code}`;
}

/** The command that runs this program again (as a worker). */
function selfCommand(): { cmd: string; args: string[] } {
  // A `deno compile`d binary runs its embedded main module by itself.
  const compiled = !/^deno(\.exe)?$/.test(Deno.execPath().split("/").pop() ?? "");
  return compiled
    ? { cmd: Deno.execPath(), args: [] }
    : { cmd: Deno.execPath(), args: ["run", "--allow-all", Deno.mainModule] };
}

interface Slot {
  readonly id: number;
  readonly vms: VmConfig[];
  readonly name: string;
  readonly watch: HeartbeatWatch;
  child: Deno.ChildProcess | null;
  token: string;
  /** control connection after the hello (-1 before) */
  ctl: number;
  generation: number;
  startedAt: number;
  crashes: number;
  ready: boolean;
  /** why the supervisor killed it (watchdog), for the death line */
  killReason: string | null;
  onReady: ((error?: string) => void) | null;
}

class ProcessSupervisor implements RunningDaemon {
  readonly #slots: Slot[] = [];
  readonly #dir = Deno.makeTempDirSync({ prefix: "vhost-user-vsock-" });
  readonly #controlPath = `${this.#dir}/control.sock`;
  readonly #listenFd: number;
  readonly #heartbeatFd: number;
  readonly #heartbeat: Mapping;
  readonly #bells: number[] = [];
  /** current link memfd per worker pair "a-b" (a < b) */
  readonly #links = new Map<string, number>();
  /** inherited `--fd`, kept to hand to a restarted worker; -1 once given away for good */
  #inheritedFd: number;
  #stopping: Promise<void> | null = null;
  #resolveStopped!: () => void;
  readonly stopped: Promise<void> = new Promise((r) => (this.#resolveStopped = r));
  #watchdogTimer: ReturnType<typeof setInterval> | undefined;
  readonly #command = selfCommand();
  readonly #stall: { cid: number; afterMs: number; ms: number } | null;

  constructor(readonly config: DaemonConfig, workers: number) {
    Deno.chmodSync(this.#dir, 0o700);
    this.#listenFd = listenUnix(this.#controlPath, { type: SOCK_SEQPACKET });
    const heartbeatBytes = Math.max(4096, workers * HEARTBEAT_STRIDE_INTS * 4);
    this.#heartbeatFd = memfdCreate("vhost-user-vsock-heartbeat", heartbeatBytes);
    this.#heartbeat = mapShared(this.#heartbeatFd, heartbeatBytes);
    const cells = new Int32Array(this.#heartbeat.bytes.buffer as ArrayBuffer);
    const watchdogMs = config.watchdogMs ?? DEFAULT_WATCHDOG_MS;
    shardVms(config.vms, workers).forEach((vms, id) => {
      this.#bells.push(eventFd());
      this.#slots.push({
        id,
        vms,
        name: workerName(id, vms),
        watch: new HeartbeatWatch(cells, id * HEARTBEAT_STRIDE_INTS, watchdogMs),
        child: null,
        token: "",
        ctl: -1,
        generation: 0,
        startedAt: 0,
        crashes: 0,
        ready: false,
        killReason: null,
        onReady: null,
      });
    });
    for (const a of this.#slots) {
      for (const b of this.#slots) {
        if (a.id < b.id && shardsShareGroup(a.vms, b.vms)) this.#newLink(a.id, b.id);
      }
    }
    this.#inheritedFd = config.socketFd ?? -1;
    const stall = Deno.env.get(STALL_FAULT_ENV)?.split(":").map(Number);
    this.#stall = stall?.length === 3 ? { cid: stall[0], afterMs: stall[1], ms: stall[2] } : null;
    this.#watchdogTimer = setInterval(
      () => this.#watchdog(),
      Math.max(20, Math.min(250, watchdogMs / 4)),
    );
    void this.#acceptLoop();
  }

  /** Starts every worker; resolves when all are ready, rejects (all stopped) if one fails. */
  async start(): Promise<void> {
    const results = await Promise.all(this.#slots.map((s) => this.#spawn(s)));
    const failed = results.find((r) => r !== undefined);
    if (failed !== undefined) {
      await this.stop();
      throw new Error(failed);
    }
  }

  /** Pids of the worker processes (for tests and tools). */
  get workerPids(): number[] {
    return this.#slots.map((s) => s.child?.pid ?? -1);
  }

  #newLink(a: number, b: number): number {
    const key = `${a}-${b}`;
    const old = this.#links.get(key);
    if (old !== undefined) close(old);
    const fd = memfdCreate(
      `vhost-user-vsock-siblings-${key}`,
      2 * ringBytes(SIBLING_RING_CAPACITY),
    );
    this.#links.set(key, fd);
    return fd;
  }

  /** Starts (or restarts) `slot`; resolves with an error message if it did not get ready. */
  #spawn(slot: Slot): Promise<string | undefined> {
    slot.token = crypto.randomUUID();
    slot.ready = false;
    slot.killReason = null;
    slot.watch.reset();
    if (slot.generation > 0) this.#renewLinks(slot);
    const plan: WorkerPlan = {
      worker: slot.id,
      generation: slot.generation,
      config: { ...this.config, vms: slot.vms },
      remotes: this.#slots.filter((s) => s !== slot).flatMap((s) =>
        s.vms.map((v) => ({ cid: v.guestCid, groups: v.groups, worker: s.id }))
      ),
    };
    const stall = this.#stall;
    if (stall !== null && slot.generation === 0 && slot.vms.some((v) => v.guestCid === stall.cid)) {
      plan.stall = { afterMs: stall.afterMs, ms: stall.ms };
    }
    const child = new Deno.Command(this.#command.cmd, {
      args: this.#command.args,
      env: { [WORKER_ENV]: `${this.#controlPath} ${slot.id} ${slot.token}` },
      stdin: "piped",
      stdout: "inherit",
      stderr: "inherit",
    }).spawn();
    slot.child = child;
    slot.startedAt = performance.now();
    const writer = child.stdin.getWriter();
    writer.write(new TextEncoder().encode(JSON.stringify(plan))).then(() => writer.close())
      .catch(() => {/* the child died already: its exit is handled below */});
    const ready = new Promise<string | undefined>((resolve) => {
      const timer = setTimeout(() => {
        slot.onReady = null;
        resolve(`${slot.name} did not start within ${START_TIMEOUT_MS} ms`);
        this.#kill(slot, "did not start in time");
      }, START_TIMEOUT_MS);
      slot.onReady = (error) => {
        clearTimeout(timer);
        slot.onReady = null;
        resolve(error);
      };
    });
    child.status.then((status) => this.#exited(slot, child, status));
    return ready;
  }

  /** A restarted worker gets fresh rings (the old ones may hold half a record). */
  #renewLinks(slot: Slot): void {
    for (const peer of this.#slots) {
      if (peer === slot) continue;
      const [a, b] = slot.id < peer.id ? [slot.id, peer.id] : [peer.id, slot.id];
      if (!this.#links.has(`${a}-${b}`)) continue;
      const fd = this.#newLink(a, b);
      if (peer.ctl >= 0) {
        this.#send(peer.ctl, this.#linkMessage(peer.id, slot.id), [fd, this.#bells[slot.id]]);
      }
    }
  }

  #linkMessage(self: number, peer: number): ControlMessage {
    return { t: "link", peer, capacity: SIBLING_RING_CAPACITY, side: self < peer ? 0 : 1 };
  }

  #send(fd: number, m: ControlMessage, fds: number[] = []): void {
    const r = sendWithFds(fd, encodeControl(m), fds);
    if (r < 0) log.warn(`control socket: cannot send ${m.t} (errno ${-r})`);
  }

  async #acceptLoop(): Promise<void> {
    while (this.#stopping === null) {
      const [revents] = await pollFdsAsync([this.#listenFd], [POLLIN], 200);
      if (this.#stopping !== null) return;
      if ((revents & POLLIN) === 0) continue;
      for (let fd = acceptRaw(this.#listenFd); fd >= 0; fd = acceptRaw(this.#listenFd)) {
        void this.#greet(fd);
      }
    }
  }

  /** Next control message on `fd`, or null on EOF/timeout. */
  async #receive(fd: number, timeoutMs: number): Promise<ControlMessage | null> {
    const [revents] = await pollFdsAsync([fd], [POLLIN], timeoutMs);
    if (revents === 0) return null;
    const buf = new Uint8Array(CONTROL_MESSAGE_MAX);
    const r = recvWithFds(fd, buf);
    if (typeof r === "number" || r.n <= 0) return null;
    for (const f of r.fds) close(f);
    try {
      return decodeControl(buf.subarray(0, r.n));
    } catch {
      return null;
    }
  }

  /** A worker connected: check who it is, hand over its fds, wait for ready. */
  async #greet(fd: number): Promise<void> {
    const hello = await this.#receive(fd, START_TIMEOUT_MS);
    const slot = hello?.t === "hello" ? this.#slots[hello.worker] : undefined;
    if (
      hello?.t !== "hello" || slot === undefined || slot.token !== hello.token ||
      slot.child?.pid !== hello.pid || slot.ctl >= 0 || this.#stopping !== null
    ) {
      close(fd);
      return;
    }
    slot.ctl = fd;
    const connectedMs = performance.now() - slot.startedAt;
    this.#handOver(slot);
    const answer = await this.#receive(fd, START_TIMEOUT_MS);
    if (slot.ctl !== fd) return; // died meanwhile
    if (answer?.t === "ready") {
      slot.ready = true;
      const ms = (performance.now() - slot.startedAt).toFixed(0);
      const timing = `${ms} ms after spawn, connected after ${connectedMs.toFixed(0)} ms`;
      if (slot.generation > 0) {
        log.info(`${slot.name} is serving again (restart ${slot.generation}, ${timing})`);
      } else if (log.debugOn) log.debug(`${slot.name} ready (${timing})`);
      slot.onReady?.();
    } else {
      const why = answer?.t === "error" ? answer.message : "no ready message";
      slot.onReady?.(`${slot.name}: ${why}`);
    }
  }

  #handOver(slot: Slot): void {
    const fd = slot.ctl;
    this.#send(fd, {
      t: "heartbeat",
      bytes: this.#heartbeat.size,
      index: slot.id * HEARTBEAT_STRIDE_INTS,
    }, [this.#heartbeatFd]);
    this.#send(fd, { t: "bell" }, [this.#bells[slot.id]]);
    if (this.#inheritedFd >= 0 && slot.vms.some((v) => v.socket === "")) {
      this.#send(fd, { t: "listen" }, [this.#inheritedFd]);
      if (getSockOptInt(this.#inheritedFd, SO_ACCEPTCONN) === 0) {
        // A connected socket: once the worker dies the front end must see EOF.
        close(this.#inheritedFd);
        this.#inheritedFd = -1;
      }
    }
    for (const peer of this.#slots) {
      if (peer === slot) continue;
      const [a, b] = slot.id < peer.id ? [slot.id, peer.id] : [peer.id, slot.id];
      const link = this.#links.get(`${a}-${b}`);
      if (link === undefined) continue;
      this.#send(fd, this.#linkMessage(slot.id, peer.id), [link, this.#bells[peer.id]]);
    }
    this.#send(fd, { t: "done" });
  }

  #exited(slot: Slot, child: Deno.ChildProcess, status: Deno.CommandStatus): void {
    if (slot.child !== child) return;
    slot.child = null;
    slot.ready = false;
    if (slot.ctl >= 0) close(slot.ctl);
    slot.ctl = -1;
    if (this.#stopping !== null) return;
    const reason = slot.killReason ?? describeExit(status);
    if (slot.onReady !== null) {
      slot.onReady(`${slot.name} ${reason} before it was ready`);
      if (slot.generation === 0) return; // the first start failed: `start` reports it
    }
    for (const peer of this.#slots) {
      if (peer.ctl >= 0) this.#send(peer.ctl, { t: "link-down", peer: slot.id });
    }
    if (
      slot.vms.some((v) => v.socket === "") && this.#inheritedFd < 0 &&
      this.config.socketFd !== undefined
    ) {
      log.error(
        `${slot.name} died: ${reason}; its inherited connection (--fd) is gone, not restarting`,
      );
      return;
    }
    const lived = performance.now() - slot.startedAt;
    slot.crashes = lived < CRASH_LOOP_WINDOW_MS ? slot.crashes + 1 : 1;
    const delay = restartDelayMs(slot.crashes);
    log.error(
      `${slot.name} died: ${reason}; restarting${delay > 0 ? ` in ${delay} ms (crash loop)` : ""}`,
    );
    setTimeout(() => {
      if (this.#stopping !== null || slot.child !== null) return;
      slot.generation++;
      void this.#spawn(slot).then((error) => {
        if (error !== undefined) log.error(`restart failed: ${error}`);
      });
    }, delay);
  }

  #kill(slot: Slot, reason: string): void {
    slot.killReason = reason;
    try {
      slot.child?.kill("SIGKILL");
    } catch { /* already gone */ }
  }

  #watchdog(): void {
    const now = performance.now();
    for (const slot of this.#slots) {
      if (!slot.ready) continue;
      const verdict = slot.watch.sample(now);
      const limit = slot.watch.limitMs;
      if (verdict === "stuck") {
        const restart = this.config.watchdogRestart === true;
        log.error(
          `watchdog: ${slot.name}: the reactor has not returned to epoll_wait for ${limit} ms${
            restart ? "; killing it" : ""
          }`,
        );
        if (restart) this.#kill(slot, `killed by the watchdog (reactor stuck for ${limit} ms)`);
      } else if (verdict === "recovered") {
        log.warn(`watchdog: ${slot.name}: the reactor is running again`);
      }
    }
  }

  stop(): Promise<void> {
    this.#stopping ??= this.#stopAll();
    return this.stopped;
  }

  async #stopAll(): Promise<void> {
    clearInterval(this.#watchdogTimer);
    const running = this.#slots.flatMap((s) => s.child === null ? [] : [s.child]);
    for (const child of running) {
      try {
        child.kill("SIGTERM");
      } catch { /* gone */ }
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const grace = new Promise<"timeout">((
      r,
    ) => (timer = setTimeout(() => r("timeout"), STOP_GRACE_MS)));
    const all = Promise.all(running.map((c) => c.status));
    if (await Promise.race([all, grace]) === "timeout") {
      for (const child of running) {
        try {
          child.kill("SIGKILL");
        } catch { /* gone */ }
      }
      await all;
    }
    clearTimeout(timer);
    for (const slot of this.#slots) {
      if (slot.ctl >= 0) close(slot.ctl);
      slot.ctl = -1;
      for (const vm of slot.vms) {
        for (const path of [vm.socket, vm.udsPath]) removeSocketFile(path);
      }
    }
    close(this.#listenFd);
    for (const fd of [...this.#bells, ...this.#links.values(), this.#heartbeatFd]) close(fd);
    if (this.#inheritedFd >= 0) close(this.#inheritedFd);
    unmap(this.#heartbeat);
    Deno.removeSync(this.#dir, { recursive: true });
    this.#resolveStopped();
  }
}

function removeSocketFile(path: string): void {
  if (path === "") return;
  try {
    if (Deno.lstatSync(path).isSocket) Deno.removeSync(path);
  } catch { /* gone already */ }
}

/** A daemon whose VMs run in supervised worker processes (see the module doc). */
export interface SupervisedDaemon extends RunningDaemon {
  /** pid of each worker process (-1 while one is being restarted) */
  readonly workerPids: number[];
}

/**
 * Starts `workers` worker processes (default: `defaultWorkerCount`) for `config.vms` and
 * resolves once every VM's socket is listening; rejects (nothing left running) otherwise.
 */
export async function startSupervised(
  config: DaemonConfig,
  workers = defaultWorkerCount(config.vms.length),
): Promise<SupervisedDaemon> {
  const supervisor = new ProcessSupervisor(config, Math.min(workers, config.vms.length));
  await supervisor.start();
  return supervisor;
}
