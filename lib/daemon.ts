/**
 * The reactor side of the daemon: builds one vsock device + vhost-user back end
 * per configured VM on a single reactor and runs it until told to stop.
 *
 * Runs inside a Worker (see `worker.ts`): the thread blocks in epoll_wait, so it
 * is stopped through its wakeup eventfd plus a shared stop flag, never through
 * Deno's event loop. In a worker process (`--workers N`, see `worker_process.ts`) the config
 * also carries the supervisor's wiring: heartbeat, control socket, links to sibling VMs of
 * other workers (`worker_wiring.ts`).
 */
import type { VmConfig } from "./config.ts";
import { log } from "./log.ts";
import { Reactor } from "./reactor.ts";
import { VhostUserBackend } from "./vhost_user/backend.ts";
import { VsockDevice } from "./vsock/device.ts";
import { SiblingHub } from "./vsock/sibling_hub.ts";
import type { WiredConfig } from "./worker_plan.ts";
import { WorkerWires } from "./worker_wiring.ts";

export interface VmInstance {
  readonly config: VmConfig;
  readonly device: VsockDevice;
  readonly backend: VhostUserBackend;
}

export class Daemon {
  readonly reactor: Reactor = new Reactor();
  readonly vms: VmInstance[] = [];
  /** switch between the VMs of this daemon that share a group */
  readonly siblings: SiblingHub = new SiblingHub();
  #wires: WorkerWires | null = null;

  constructor(readonly config: WiredConfig) {}

  /** Creates and starts listening for every VM; throws (with a clear message) on failure. */
  start(): void {
    const wiring = this.config.worker;
    if (wiring !== undefined) {
      log.setPrefix(`[w${wiring.worker} cid ${this.config.vms.map((v) => v.guestCid).join(",")}]`);
      this.#wires = new WorkerWires(this.reactor, this.siblings, wiring, () => this.reactor.stop());
    }
    for (const vm of this.config.vms) {
      const device = new VsockDevice({
        guestCid: vm.guestCid,
        udsPath: vm.udsPath,
        txBufferSize: vm.txBufferSize,
        queueSize: vm.queueSize,
        connectTimeoutMs: this.config.connectTimeoutMs,
        maxConnections: this.config.maxConnections,
        groups: vm.groups,
        hub: this.siblings,
        datagrams: this.config.datagrams,
        rxWeights: new Map(this.config.rxWeights ?? []),
        autotune: this.config.noAutotune !== true,
        maxBufferMemory: this.config.maxBufferMemory,
      });
      const backend = new VhostUserBackend(this.reactor, device, {
        socketPath: vm.socket !== "" ? vm.socket : undefined,
        listenFd: vm.socket === "" ? this.config.socketFd : undefined,
      });
      backend.listen();
      this.vms.push({ config: vm, device, backend });
    }
  }

  /** Runs the reactor until `stop()` (or `shouldStop()` turns true on a wakeup). */
  run(shouldStop: () => boolean): void {
    this.reactor.onWake(() => {
      if (shouldStop()) this.reactor.stop();
    });
    this.reactor.pollUs = this.config.pollUs ?? 0;
    this.reactor.run();
  }

  /** Closes every VM (host sockets, socket files) and the reactor. */
  close(): void {
    for (const vm of this.vms) {
      try {
        vm.backend.close();
        vm.device.dispose();
      } catch (e) {
        log.warn(`shutdown of CID ${vm.config.guestCid}: ${e instanceof Error ? e.message : e}`);
      }
    }
    this.#wires?.close();
    this.reactor.close();
  }
}
