/**
 * In-process harness for device-level race tests: a real `VsockDevice` on a real
 * `Reactor`, its rings in memfd-backed guest memory that this thread also drives
 * as the guest (DriverSplitQueue), with a hook on every device write to guest
 * memory. Everything runs on the test's thread, so a test can stop the device
 * between two of its own steps and interleave guest actions exactly there.
 */
import { close, type Mapping, mapShared, memfdCreate, unmap } from "../../ffi/mod.ts";
import { Reactor } from "../../lib/reactor.ts";
import { VsockDevice } from "../../lib/vsock/device.ts";
import { findRegion, type GuestMemory, type MemRegion } from "../../lib/virtio/memory.ts";
import { SplitQueue } from "../../lib/virtio/split_queue.ts";
import { compactRingLayout } from "../../lib/virtio/split_layout.ts";
import { DriverSplitQueue } from "../../lib/testing/driver_queue.ts";
import { PacketHeader } from "../../lib/vsock/packet.ts";
import { VIRTIO_VSOCK_HDR_SIZE } from "../../lib/vsock/constants.ts";
import {
  VIRTIO_F_VERSION_1_MASK,
  VIRTIO_RING_F_EVENT_IDX_MASK,
} from "../../lib/virtio/features.ts";

/** Guest memory over one memfd mapping, with a hook on device writes. */
export class HookedMemory implements GuestMemory {
  readonly regions: MemRegion[];
  readonly #mapping: Mapping;
  onDeviceWrite: ((gpa: number, len: number) => void) | null = null;

  constructor(size: number) {
    const fd = memfdCreate("inprocess-guest", size);
    this.#mapping = mapShared(fd, size);
    close(fd);
    const m = this.#mapping;
    this.regions = [{
      gpa: 0,
      size,
      bytes: m.bytes,
      view: new DataView(m.bytes.buffer),
      hostAddr: m.addr,
    }];
  }
  regionOf(gpa: number, len: number): number {
    return findRegion(this.regions, gpa, len);
  }
  markDirty(gpa: number, len: number): void {
    this.onDeviceWrite?.(gpa, len);
  }
  dispose(): void {
    unmap(this.#mapping);
  }
}

export const QUEUE_SIZE = 64;
const RX_RING = 0x1000;
const TX_RING = 0x8000;
const BUFFERS = 0x20000;
const BUF_SIZE = 4096 + VIRTIO_VSOCK_HDR_SIZE;

export class InProcessVm {
  readonly reactor = new Reactor();
  readonly mem = new HookedMemory(4 << 20);
  readonly dir = Deno.makeTempDirSync({ prefix: "vuv-inproc-" });
  readonly udsPath = `${this.dir}/vm.vsock`;
  readonly device: VsockDevice;
  readonly rxDev: SplitQueue;
  readonly txDev: SplitQueue;
  readonly rxDrv: DriverSplitQueue;
  readonly txDrv: DriverSplitQueue;
  rxCalls = 0;
  txCalls = 0;
  #nextBuf = BUFFERS;

  constructor(readonly guestCid = 3) {
    this.device = new VsockDevice({
      guestCid,
      udsPath: this.udsPath,
      txBufferSize: 64 * 1024,
      queueSize: QUEUE_SIZE,
      connectTimeoutMs: 60_000,
      maxConnections: 64,
    });
    this.device.attach(this.reactor);
    this.device.setFeatures(VIRTIO_F_VERSION_1_MASK | VIRTIO_RING_F_EVENT_IDX_MASK);
    const rx = compactRingLayout(QUEUE_SIZE, RX_RING, true);
    const tx = compactRingLayout(QUEUE_SIZE, TX_RING, true);
    const opts = { eventIdx: true, indirect: false };
    this.rxDev = new SplitQueue(QUEUE_SIZE, this.mem, rx.descGpa, rx.availGpa, rx.usedGpa, opts);
    this.txDev = new SplitQueue(QUEUE_SIZE, this.mem, tx.descGpa, tx.availGpa, tx.usedGpa, opts);
    this.rxDrv = new DriverSplitQueue(this.mem, QUEUE_SIZE, rx.descGpa, rx.availGpa, rx.usedGpa, {
      eventIdx: true,
    });
    this.txDrv = new DriverSplitQueue(this.mem, QUEUE_SIZE, tx.descGpa, tx.availGpa, tx.usedGpa, {
      eventIdx: true,
    });
  }

  /** Hands both rings to the device, as the back end does when they become active. */
  activate(): void {
    this.device.queueActive({
      index: 0,
      queue: this.rxDev,
      notifier: { notify: () => this.rxCalls++ },
    });
    this.device.queueActive({
      index: 1,
      queue: this.txDev,
      notifier: { notify: () => this.txCalls++ },
    });
    this.device.queueKicked(0);
    this.device.queueKicked(1);
  }

  /** Posts `n` RX buffers; returns whether the device asked for a kick (not delivered). */
  postRxBuffers(n: number): boolean {
    for (let i = 0; i < n; i++) {
      const gpa = this.#nextBuf;
      this.#nextBuf += BUF_SIZE + 12;
      this.rxDrv.addBuffer([{ gpa, len: BUF_SIZE, writable: true }]);
      this.#bufs.set(gpa, gpa);
    }
    this.rxDrv.publish();
    return this.rxDrv.kickNeeded();
  }
  readonly #bufs = new Map<number, number>();

  /** Runs the reactor until idle (bounded). */
  run(rounds = 5, timeoutMs = 10): void {
    for (let i = 0; i < rounds; i++) this.reactor.runOnce(timeoutMs);
  }

  /** Reaps RX used buffers and decodes their headers. */
  reapRx(): PacketHeader[] {
    const out: PacketHeader[] = [];
    for (;;) {
      const u = this.rxDrv.popUsed();
      if (u === null) return out;
      const gpa = this.#descAddr(this.rxDrv, u.head);
      out.push(new PacketHeader().decodeFrom(this.mem.regions[0].view, gpa));
    }
  }

  #descAddr(q: DriverSplitQueue, head: number): number {
    return Number(this.mem.regions[0].view.getBigUint64(q.descGpa + 16 * head, true));
  }

  dispose(): void {
    this.device.dispose();
    this.reactor.close();
    this.mem.dispose();
    Deno.removeSync(this.dir, { recursive: true });
  }
}
