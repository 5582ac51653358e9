/**
 * In-process harness for device-level race tests: a real `VsockDevice` on a real
 * `Reactor`, its rings in memfd-backed guest memory that this thread also drives
 * as the guest (`DriverSplitQueue`, or with `packed` `DriverPackedQueue` over the
 * device's `PackedQueue`: VIRTIO_F_RING_PACKED), with a hook on every device write
 * to guest memory. Everything runs on the test's thread, so a test can stop the
 * device between two of its own steps and interleave guest actions exactly there.
 * `InProcessGuest` writes packets by hand; `establishStream` opens a host-initiated stream
 * through it.
 */
import assert from "node:assert/strict";
import {
  close,
  connectUnix,
  type Mapping,
  mapShared,
  memfdCreate,
  readRaw,
  unmap,
  writeRaw,
} from "../../ffi/mod.ts";
import { Reactor } from "../../lib/reactor.ts";
import { VsockDevice } from "../../lib/vsock/device.ts";
import { findRegion, type GuestMemory, type MemRegion } from "../../lib/virtio/memory.ts";
import { SplitQueue } from "../../lib/virtio/split_queue.ts";
import { PackedQueue } from "../../lib/virtio/packed_queue.ts";
import { availEventOffset, compactRingLayout } from "../../lib/virtio/split_layout.ts";
import { compactPackedRingLayout, PACKED_EVENT_OFF_WRAP } from "../../lib/virtio/packed_layout.ts";
import { DriverSplitQueue } from "../../lib/testing/driver_queue.ts";
import { DriverPackedQueue } from "../../lib/testing/driver_packed_queue.ts";
import { PacketHeader } from "../../lib/vsock/packet.ts";
import {
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RESPONSE,
  VIRTIO_VSOCK_TYPE_STREAM,
} from "../../lib/vsock/constants.ts";
import {
  VIRTIO_F_RING_PACKED_MASK,
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

/** The driver side of a ring in the layout `P` says (true: packed). */
export type DriverQueueOf<P extends boolean> = P extends true ? DriverPackedQueue
  : DriverSplitQueue;
/** The device side of a ring in the layout `P` says (true: packed). */
export type DeviceQueueOf<P extends boolean> = P extends true ? PackedQueue : SplitQueue;

/** Both sides of one ring at `gpa` (EVENT_IDX on, no indirect descriptors). */
function ringAt<P extends boolean>(
  mem: HookedMemory,
  gpa: number,
  packed: P,
): { dev: DeviceQueueOf<P>; drv: DriverQueueOf<P> } {
  const opts = { eventIdx: true, indirect: false };
  if (packed) {
    const l = compactPackedRingLayout(QUEUE_SIZE, gpa);
    const a = [l.descGpa, l.driverEventGpa, l.deviceEventGpa] as const;
    return {
      dev: new PackedQueue(QUEUE_SIZE, mem, ...a, opts) as DeviceQueueOf<P>,
      drv: new DriverPackedQueue(mem, QUEUE_SIZE, ...a, opts) as DriverQueueOf<P>,
    };
  }
  const l = compactRingLayout(QUEUE_SIZE, gpa, true);
  const a = [l.descGpa, l.availGpa, l.usedGpa] as const;
  return {
    dev: new SplitQueue(QUEUE_SIZE, mem, ...a, opts) as DeviceQueueOf<P>,
    drv: new DriverSplitQueue(mem, QUEUE_SIZE, ...a, opts) as DriverQueueOf<P>,
  };
}

export class InProcessVm<P extends boolean = false> {
  readonly reactor = new Reactor();
  readonly mem = new HookedMemory(4 << 20);
  readonly dir = Deno.makeTempDirSync({ prefix: "vuv-inproc-" });
  readonly udsPath = `${this.dir}/vm.vsock`;
  readonly device: VsockDevice;
  readonly rxDev: DeviceQueueOf<P>;
  readonly txDev: DeviceQueueOf<P>;
  readonly rxDrv: DriverQueueOf<P>;
  readonly txDrv: DriverQueueOf<P>;
  rxCalls = 0;
  txCalls = 0;
  #nextBuf = BUFFERS;
  /** packed: rx buffer id -> its guest address */
  readonly #bufs = new Map<number, number>();

  /** A device with split rings, or packed rings with `packed` true. */
  constructor(readonly guestCid = 3, readonly packed: P = false as P) {
    this.device = new VsockDevice({
      guestCid,
      udsPath: this.udsPath,
      txBufferSize: 64 * 1024,
      queueSize: QUEUE_SIZE,
      connectTimeoutMs: 60_000,
      maxConnections: 64,
    });
    this.device.attach(this.reactor);
    this.device.setFeatures(
      VIRTIO_F_VERSION_1_MASK | VIRTIO_RING_F_EVENT_IDX_MASK |
        (packed ? VIRTIO_F_RING_PACKED_MASK : 0n),
    );
    const rx = ringAt(this.mem, RX_RING, packed);
    const tx = ringAt(this.mem, TX_RING, packed);
    this.rxDev = rx.dev;
    this.rxDrv = rx.drv;
    this.txDev = tx.dev;
    this.txDrv = tx.drv;
  }

  /**
   * Where the device writes when it re-enables notifications of `q` (EVENT_IDX): a split
   * ring's avail_event, a packed ring's device event suppression off_wrap.
   */
  notifyEnableGpa(q: DriverSplitQueue | DriverPackedQueue): number {
    if (q.packed) return q.deviceEventGpa + PACKED_EVENT_OFF_WRAP;
    return q.usedGpa + availEventOffset(q.size);
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

  /** Adds one rx buffer of `len` writable bytes at `gpa` (published by the caller). */
  addRxBuffer(gpa: number, len: number): void {
    const id = this.rxDrv.addBuffer([{ gpa, len, writable: true }]);
    if (this.packed) this.#bufs.set(id, gpa);
  }

  /** Posts `n` RX buffers; returns whether the device asked for a kick (not delivered). */
  postRxBuffers(n: number): boolean {
    for (let i = 0; i < n; i++) {
      this.addRxBuffer(this.#nextBuf, BUF_SIZE);
      this.#nextBuf += BUF_SIZE + 12;
    }
    this.rxDrv.publish();
    return this.rxDrv.kickNeeded();
  }

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
      const gpa = this.#rxBufAddr(u.head);
      out.push(new PacketHeader().decodeFrom(this.mem.regions[0].view, gpa));
    }
  }

  /**
   * Guest address of the rx buffer `head` the device used: its descriptor table entry (split),
   * or where `postRxBuffers` posted it (packed: a used descriptor's address is reserved).
   */
  #rxBufAddr(head: number): number {
    const q = this.rxDrv;
    if (!q.packed) {
      return Number(this.mem.regions[0].view.getBigUint64(q.descGpa + 16 * head, true));
    }
    const gpa = this.#bufs.get(head);
    if (gpa === undefined) throw new Error(`rx used id ${head} was not posted by postRxBuffers`);
    this.#bufs.delete(head);
    return gpa;
  }

  dispose(): void {
    this.device.dispose();
    this.reactor.close();
    this.mem.dispose();
    Deno.removeSync(this.dir, { recursive: true });
  }
}

/** Guest memory InProcessGuest takes its packets and buffers from (above the rings'). */
const TX_AREA = 0x200000;
const RX_AREA = 0x300000;

/** A guest written by hand: packets on the tx ring, rx buffers of any size. */
export class InProcessGuest {
  #tx = TX_AREA;
  #rx = RX_AREA;
  constructor(readonly vm: InProcessVm<boolean>) {}

  /** Puts a packet on the tx ring and kicks. */
  send(fields: Partial<PacketHeader>, payload = new Uint8Array(0)): void {
    const h = Object.assign(new PacketHeader(), {
      srcCid: this.vm.guestCid,
      dstCid: 2,
      type: VIRTIO_VSOCK_TYPE_STREAM,
      bufAlloc: 256 * 1024,
      ...fields,
    });
    h.len = payload.length;
    const gpa = this.#tx;
    this.#tx += VIRTIO_VSOCK_HDR_SIZE + payload.length + 64;
    const mem = this.vm.mem.regions[0];
    h.encodeTo(mem.view, gpa);
    mem.bytes.set(payload, gpa + VIRTIO_VSOCK_HDR_SIZE);
    this.vm.txDrv.addBuffer([{
      gpa,
      len: VIRTIO_VSOCK_HDR_SIZE + payload.length,
      writable: false,
    }]);
    this.vm.txDrv.publish();
    this.vm.device.queueKicked(1);
  }

  /** Posts `n` rx buffers of `size` writable bytes (no kick). */
  postRx(size: number, n: number): void {
    for (let i = 0; i < n; i++) {
      this.vm.addRxBuffer(this.#rx, size);
      this.#rx += size + 64;
    }
    this.vm.rxDrv.publish();
  }
}

/** A host app connected through CONNECT and accepted by the guest; returns its fd and port. */
export function establishStream(
  vm: InProcessVm<boolean>,
  g: InProcessGuest,
  guestPort: number,
): { host: number; port: number } {
  const host = connectUnix(vm.udsPath);
  writeRaw(host, new TextEncoder().encode(`CONNECT ${guestPort}\n`));
  g.postRx(4096, 1);
  vm.run(4);
  const [req] = vm.reapRx();
  assert.equal(req.op, VIRTIO_VSOCK_OP_REQUEST);
  g.send({ op: VIRTIO_VSOCK_OP_RESPONSE, srcPort: guestPort, dstPort: req.srcPort });
  vm.run(2);
  const ok = new Uint8Array(32);
  const n = readRaw(host, ok);
  assert.equal(new TextDecoder().decode(ok.subarray(0, n)), `OK ${req.srcPort}\n`);
  return { host, port: req.srcPort };
}
