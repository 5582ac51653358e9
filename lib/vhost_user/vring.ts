/**
 * One vring as the vhost-user protocol sees it (vhost-user.rst "Ring states").
 *
 * A ring has two independent states: started/stopped and enabled/disabled.
 * It begins stopped and disabled. It starts when its kick fd is set
 * (SET_VRING_KICK) and stops on GET_VRING_BASE. Without
 * VHOST_USER_F_PROTOCOL_FEATURES a ring is enabled as soon as it starts; with
 * it, SET_VRING_ENABLE decides. The device sees the ring only while it is
 * *active*: started, enabled, and translated into a valid `VirtQueue`
 * (`SplitQueue`, or `PackedQueue` when VIRTIO_F_RING_PACKED was negotiated).
 *
 * A kick that arrives while the ring is not active is not lost: activation
 * always processes the ring as if it had been kicked ("never drop a kick").
 */
import { close, eventFdWrite } from "../../ffi/mod.ts";
import type { VirtQueue } from "../virtio/virtqueue.ts";
import type { QueueNotifier } from "./device.ts";

export class Vring implements QueueNotifier {
  num = 0;
  descUser = 0;
  availUser = 0;
  usedUser = 0;
  addrFlags = 0;
  logGuestAddr = 0n;
  hasAddr = false;
  /**
   * SET_VRING_BASE: where the ring starts (`VirtQueue.ringBase`): the next avail index of a
   * split ring; of a packed ring, its avail and used positions with their wrap counters
   * (bits 0-14, 15, 16-30, 31: packed_layout.ts `packedRingBase`)
   */
  base = 0;
  kickFd = -1;
  callFd = -1;
  errFd = -1;
  started = false;
  enabled = false;
  /** handed to the device */
  active = false;
  queue: VirtQueue | null = null;
  /** kicks seen while not active (for logs and tests; activation processes the ring anyway) */
  pendingKicks = 0;
  /** what the last GET_VRING_BASE returned (driver-reset detection) */
  stoppedAt: number | null = null;
  /** ring addresses at the last stop (driver-reset detection) */
  stoppedAddr: string | null = null;

  constructor(readonly index: number) {}

  notify(): void {
    if (this.callFd >= 0) eventFdWrite(this.callFd);
  }

  addrKey(): string {
    return `${this.descUser}/${this.availUser}/${this.usedUser}/${this.num}`;
  }

  setCallFd(fd: number): void {
    if (this.callFd >= 0 && this.callFd !== fd) close(this.callFd);
    this.callFd = fd;
  }

  setErrFd(fd: number): void {
    if (this.errFd >= 0 && this.errFd !== fd) close(this.errFd);
    this.errFd = fd;
  }

  /** Closes every fd the ring holds (the kick fd must already be off the reactor). */
  closeFds(): void {
    if (this.kickFd >= 0) close(this.kickFd);
    this.kickFd = -1;
    this.setCallFd(-1);
    this.setErrFd(-1);
  }
}
