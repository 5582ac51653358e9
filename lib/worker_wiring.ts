/**
 * The reactor side of a worker process (`--workers N`): what the supervisor handed over
 * (`worker_plan.ts` WorkerWiring) put to work on the reactor thread.
 *
 * - heartbeat: the reactor bumps this worker's counter in the shared heartbeat file around
 *   every epoll_wait (`Reactor.setHeartbeat`); the supervisor's watchdog reads it.
 * - siblings on other workers: `sibling_links.ts`.
 * - control socket: `link` / `link-down` messages from the supervisor when a peer worker is
 *   restarted; end of file means the supervisor is gone, and the worker stops (so no worker
 *   outlives its supervisor, even one killed with SIGKILL).
 * - the test-only stall fault (`STALL_FAULT_ENV`): blocks the reactor once, for the
 *   watchdog tests.
 */
import {
  close,
  EAGAIN,
  ECONNRESET,
  EPOLLIN,
  errnoName,
  type Mapping,
  mapShared,
  recvWithFds,
  unmap,
} from "../ffi/mod.ts";
import { log } from "./log.ts";
import type { Reactor } from "./reactor.ts";
import { SiblingLinks } from "./sibling_links.ts";
import type { SiblingHub } from "./vsock/sibling_hub.ts";
import { decodeControl, type WorkerWiring } from "./worker_plan.ts";

const CONTROL_MESSAGE_MAX = 64 * 1024;

export class WorkerWires {
  readonly #heartbeat: Mapping;
  readonly #links: SiblingLinks;
  readonly #buf = new Uint8Array(CONTROL_MESSAGE_MAX);

  constructor(
    readonly reactor: Reactor,
    hub: SiblingHub,
    readonly wiring: WorkerWiring,
    /** the supervisor went away */
    onOrphaned: () => void,
  ) {
    this.#heartbeat = mapShared(wiring.heartbeatFd, wiring.heartbeatBytes);
    close(wiring.heartbeatFd);
    reactor.setHeartbeat(
      new Int32Array(this.#heartbeat.bytes.buffer as ArrayBuffer),
      wiring.heartbeatIndex,
    );
    this.#links = new SiblingLinks(reactor, hub, wiring.bellFd, wiring.remotes, wiring.links);
    reactor.addFd(wiring.controlFd, EPOLLIN, () => this.#onControl(onOrphaned));
    const stall = wiring.stall;
    if (stall !== undefined) {
      reactor.setTimer(stall.afterMs, () => {
        log.warn(`test fault: blocking the reactor for ${stall.ms} ms`);
        Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, stall.ms);
      });
    }
  }

  #onControl(onOrphaned: () => void): void {
    const fd = this.wiring.controlFd;
    for (;;) {
      const r = recvWithFds(fd, this.#buf);
      if (typeof r === "number") {
        if (r === -EAGAIN) return;
        if (r !== -ECONNRESET) log.error(`control socket: ${errnoName(-r)}`);
      } else if (r.n > 0) {
        this.#handle(r.n, r.fds);
        continue;
      }
      this.reactor.removeFd(fd);
      log.warn("the supervisor is gone; stopping");
      onOrphaned();
      return;
    }
  }

  #handle(n: number, fds: number[]): void {
    const m = decodeControl(this.#buf.subarray(0, n));
    if (m.t === "link" && fds.length === 2) {
      this.#links.attach({ ...m, memfd: fds[0], peerBellFd: fds[1] });
      log.info(`siblings: link to worker ${m.peer} up`);
    } else if (m.t === "link-down") {
      this.#links.down(m.peer);
      log.info(`siblings: worker ${m.peer} is down; packets to its VMs get RST`);
    } else {
      for (const f of fds) close(f);
      log.warn(`control socket: unexpected message ${m.t}`);
    }
  }

  close(): void {
    this.#links.close();
    this.reactor.removeFd(this.wiring.controlFd);
    close(this.wiring.controlFd);
    unmap(this.#heartbeat);
  }
}
