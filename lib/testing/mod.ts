/**
 * The testing library (`@vhost-user-vsock/vhost-user-vsock/testing`): a scripted VMM
 * (`VhostUserFrontEnd`) and Linux-like virtio-vsock guest driver (`VsockGuest`) that talk to
 * any vhost-user vsock back end over a real Unix socket, with memfd guest RAM and eventfds,
 * plus host-side hybrid-vsock helpers, fault injection, and a back-end process runner.
 *
 * Quick start:
 *
 * ```ts
 * import { readExactly, startVm } from "@vhost-user-vsock/vhost-user-vsock/testing";
 *
 * Deno.test("echo through the guest", async () => {
 *   const vm = await startVm({ profile: "qemu", cid: 3 });
 *   try {
 *     const listener = vm.guest.listen(5000);
 *     const [host, conn] = await Promise.all([vm.hostConnect(5000), listener.accept()]);
 *     await conn.write(new TextEncoder().encode("ping"));
 *     const got = await readExactly(host.conn, 4);
 *     // ...
 *     host.conn.close();
 *     await conn.close();
 *   } finally {
 *     await vm.stop();
 *   }
 * });
 * ```
 *
 * Always `await vm.stop()` (or `guest.close()` for hand-assembled set-ups) before a test ends:
 * it ends the driver's pending poll, closes fds and stops the back end.
 */

import {
  type BackendExit,
  type BackendOptions,
  type BackendProcess,
  spawnBackend,
} from "./backend_process.ts";
import { Faults } from "./faults.ts";
import { type FrontEndOptions, type FrontEndProfile, VhostUserFrontEnd } from "./front_end.ts";
import { GuestRam } from "./guest_ram.ts";
import { VsockGuest, type VsockGuestOptions } from "./guest_driver.ts";
import {
  hostConnect,
  type HostConnection,
  hostListen,
  type HostListener,
  type HostTimeout,
} from "./host.ts";

export * from "./backend_process.ts";
export * from "./bytes.ts";
export * from "./faults.ts";
export * from "./front_end.ts";
export * from "./guest_conn.ts";
export * from "./guest_driver.ts";
export * from "./guest_fuzz.ts";
export * from "./guest_ram.ts";
export * from "./host.ts";
export * from "./timeout.ts";
export { DriverSplitQueue } from "./driver_queue.ts";
export type { DriverQueue, DriverQueueOptions, DriverSegment, UsedElem } from "./driver_queue.ts";
export { DriverPackedQueue, PACKED_RING_START_BASE } from "./driver_packed_queue.ts";
export type { DriverPackedQueueOptions, PackedRawDesc } from "./driver_packed_queue.ts";
export { type AnyDriverQueue, baseAvailIdx, baseUsedIdx } from "./driver_rings.ts";
export { PacketHeader } from "../vsock/packet.ts";
export * from "../vsock/constants.ts";

/** Options of `startVm`. */
export interface StartVmOptions {
  /** VMM to imitate (default "qemu") */
  readonly profile?: FrontEndProfile;
  /** guest CID (default 3) */
  readonly cid?: number;
  /** how to run the back end (default: this repository's main.ts) */
  readonly backend?: Omit<BackendOptions, "cid">;
  /** front-end options (profile and memory are set by startVm) */
  readonly frontEnd?: Omit<FrontEndOptions, "profile" | "memory">;
  /** guest driver options */
  readonly guest?: VsockGuestOptions;
}

/** A running back end + VMM + guest, from `startVm`. */
export interface VmHandle {
  readonly backend: BackendProcess;
  /** the guest's RAM (outlives reconnects; closed by `stop`) */
  readonly memory: GuestRam;
  readonly guest: VsockGuest;
  /** the current front end (changes after `faults.reconnect()`) */
  readonly frontEnd: VhostUserFrontEnd;
  /** fault hooks bound to the guest */
  readonly faults: Faults;
  readonly cid: number;
  /** vhost-user socket */
  readonly socketPath: string;
  /** hybrid vsock socket (`--uds-path`) */
  readonly udsPath: string;
  /** `hostConnect(udsPath, port)` */
  hostConnect(
    port: number,
    opts?: HostTimeout & { initialData?: Uint8Array },
  ): Promise<HostConnection>;
  /** `hostListen(udsPath, port)` */
  hostListen(port: number): HostListener;
  /**
   * Tears everything down: closes the guest driver, the front end, guest RAM, then stops the
   * back end (SIGTERM). Returns the back end's exit and output. Idempotent.
   */
  stop(): Promise<BackendExit>;
}

/**
 * Spawns the back end, connects a front end of `profile` (realize sequence), and boots the
 * guest driver (probe, DRIVER_OK, buffers posted). On failure everything started is torn
 * down and the error carries the back end's stderr.
 */
export async function startVm(opts: StartVmOptions = {}): Promise<VmHandle> {
  const cid = opts.cid ?? 3;
  const backend = await spawnBackend({ ...opts.backend, cid });
  let memory: GuestRam | null = null;
  let fe: VhostUserFrontEnd | null = null;
  let guest: VsockGuest | null = null;
  try {
    memory = new GuestRam({
      regions: opts.frontEnd?.regions,
      singleMemfd: opts.frontEnd?.singleMemfd,
    });
    fe = await VhostUserFrontEnd.connect(backend.socketPath, {
      ...opts.frontEnd,
      profile: opts.profile ?? "qemu",
      memory,
    });
    guest = await VsockGuest.boot(fe, opts.guest);
  } catch (e) {
    await guest?.close();
    fe?.close();
    memory?.close();
    const exit = await backend.stop();
    const msg = e instanceof Error ? e.message : String(e);
    throw new Error(`startVm failed: ${msg}\nback end stderr:\n${exit.stderr}`, { cause: e });
  }
  const g = guest;
  const mem = memory;
  const faults = new Faults(g);
  let stopped: Promise<BackendExit> | null = null;
  return {
    backend,
    memory: mem,
    guest: g,
    get frontEnd() {
      return g.frontEnd;
    },
    faults,
    cid,
    socketPath: backend.socketPath,
    udsPath: backend.udsPath,
    hostConnect: (port, o) => hostConnect(backend.udsPath, port, o),
    hostListen: (port) => hostListen(backend.udsPath, port),
    stop() {
      stopped ??= (async () => {
        await g.close();
        g.frontEnd.close();
        mem.close();
        return await backend.stop();
      })();
      return stopped;
    },
  };
}
