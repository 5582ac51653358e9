/**
 * The virtqueues of the testing guest driver (`VsockGuest`), like Linux's
 * `net/vmw_vsock/virtio_transport.c` (the virtqueue side of virtio-vsock): the three rings
 * (rx 0, tx 1, event 2) laid out in guest RAM, split or (VIRTIO_F_RING_PACKED acked) packed
 * (driver_rings.ts), and the buffers posted on them and reaped from them.
 *
 * - rx: one device-writable descriptor of 44 + 4096 bytes per buffer (`rxBufSize`), posted
 *   until the ring is full (`virtio_vsock_rx_fill`); reaped buffers go back to the free list and
 *   are re-posted by the driver's refill policy.
 * - tx: each packet is a header descriptor plus payload descriptor(s) in one chain, through an
 *   indirect table when INDIRECT_DESC is negotiated and the chain has more than one
 *   descriptor, as `virtqueue_add_sgs` does. Payload is copied into preallocated tx buffers
 *   (`txSlots` of them); buffers come back when the device puts the chain on the used ring.
 * - event: 8 buffers of 4 bytes, re-posted as soon as they are reaped
 *   (`virtio_vsock_event_fill_one`).
 * - notifications: kicks follow `virtqueue_kick_prepare` (VRING_USED_F_NO_NOTIFY, or
 *   avail_event with EVENT_IDX; packed: the device event suppression structure); used rings
 *   are drained with callbacks disabled and then
 *   re-enabled with a re-check (`virtqueue_enable_cb`), so no interrupt is needed for work that
 *   raced the re-enable.
 *
 * Chains a test wrote raw (`VsockGuest.addRawChain`) are recognised when reaped and recorded in
 * `rawUsed` instead of being dispatched.
 */

import { descTableSize, VRING_DESC_NEXT, VRING_DESC_SIZE } from "../virtio/split_layout.ts";
import {
  VIRTIO_VSOCK_EVENT_SIZE,
  VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
  VIRTIO_VSOCK_HDR_SIZE,
  VSOCK_VQ_COUNT,
  VSOCK_VQ_EVENT,
  VSOCK_VQ_RX,
  VSOCK_VQ_TX,
} from "../vsock/constants.ts";
import type { PacketHeader } from "../vsock/packet.ts";
import {
  allocDriverRing,
  type AnyDriverQueue,
  describePosition,
  ringFeatures,
} from "./driver_rings.ts";
import type { QueueSetup } from "./front_end.ts";
import { GuestConnError } from "./guest_conn.ts";
import type { GuestStats, RawDescriptor, RawUsed, VsockGuestOptions } from "./guest_types.ts";
import type { GuestRam } from "./guest_ram.ts";

/** Linux's VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE. */
export const LINUX_RX_BUF_SIZE = 4096;
/** Linux's `event_list` size. */
export const LINUX_EVENT_BUFFERS = 8;

/** A preallocated tx buffer: header, indirect table and payload in one block. */
export interface TxSlot {
  readonly index: number;
  readonly block: number;
  readonly hdrGpa: number;
  readonly indirectGpa: number;
  readonly payloadGpa: number;
  readonly hdrView: DataView;
  readonly hdrOff: number;
  readonly payload: Uint8Array;
  /** reused segment list: header + payload segments */
  readonly segs: { gpa: number; len: number; writable: boolean }[];
}

/** An rx or event buffer. */
export interface RxBuf {
  readonly gpa: number;
  readonly bytes: Uint8Array;
  readonly view: DataView;
}

/** What outlives one set of rings (a driver reset allocates new ones). */
export interface RingContext {
  readonly memory: GuestRam;
  readonly opts: VsockGuestOptions;
  readonly stats: GuestStats;
  /** back-end misbehaviour (VsockGuest.anomalies) */
  readonly anomalies: string[];
  /** per queue: heads of raw chains still outstanding */
  readonly rawHeads: Set<number>[];
  /** raw chains the device returned (VsockGuest.rawUsed) */
  readonly rawUsed: RawUsed[];
}

/** The rings of one probe and the buffers on them. */
export class GuestRings {
  rxPosted = 0;
  rxMaxPosted = 0;
  readonly dirty: boolean[] = [false, false, false];
  readonly rxHead: Int32Array;
  readonly rxFree: number[];
  readonly txHead: Int32Array;
  readonly txFree: number[];
  readonly evHead: Int32Array;

  private constructor(
    readonly ctx: RingContext,
    readonly queues: AnyDriverQueue[],
    readonly setups: QueueSetup[],
    readonly blocks: number[],
    readonly rxBufs: RxBuf[],
    readonly tx: TxSlot[],
    readonly evBufs: RxBuf[],
    readonly indirect: boolean,
    readonly packed: boolean,
  ) {
    const size = setups[0].size;
    this.rxHead = new Int32Array(size).fill(-1);
    this.rxFree = rxBufs.map((_, i) => rxBufs.length - 1 - i);
    this.txHead = new Int32Array(size).fill(-1);
    this.txFree = tx.map((_, i) => tx.length - 1 - i);
    this.evHead = new Int32Array(size).fill(-1);
  }

  /** Lays out the three rings of `size` entries and every buffer in guest RAM. */
  static alloc(ctx: RingContext, size: number, features: bigint): GuestRings {
    const m = ctx.memory;
    const opts = ctx.opts;
    const rf = ringFeatures(features);
    const blocks: number[] = [];
    const alloc = (n: number, align: number) => {
      const g = m.alloc(n, align);
      blocks.push(g);
      return g;
    };
    try {
      const queues: AnyDriverQueue[] = [];
      const setups: QueueSetup[] = [];
      for (let i = 0; i < VSOCK_VQ_COUNT; i++) {
        const ring = allocDriverRing(m, alloc, i, size, rf);
        queues.push(ring.queue);
        setups.push(ring.setup);
      }
      const rxBufSize = opts.rxBufSize ?? LINUX_RX_BUF_SIZE;
      const rxCount = Math.min(opts.rxBuffers ?? size, size);
      const rxBufs: RxBuf[] = [];
      for (let i = 0; i < rxCount; i++) {
        rxBufs.push(
          buf(m, alloc(VIRTIO_VSOCK_HDR_SIZE + rxBufSize, 64), VIRTIO_VSOCK_HDR_SIZE + rxBufSize),
        );
      }
      const segsPer = Math.max(1, opts.txPayloadSegments ?? 1);
      const maxPayload = opts.maxPacketPayload ?? 65536;
      const slots = Math.max(1, opts.txSlots ?? Math.min(size, 64));
      const indirectBytes = Math.ceil(descTableSize(1 + segsPer) / 64) * 64;
      const tx: TxSlot[] = [];
      for (let i = 0; i < slots; i++) {
        const block = alloc(64 + indirectBytes + maxPayload, 64);
        const hdr = m.bytesAt(block, 64);
        tx.push({
          index: i,
          block,
          hdrGpa: block,
          indirectGpa: block + 64,
          payloadGpa: block + 64 + indirectBytes,
          hdrView: new DataView(hdr.buffer, hdr.byteOffset, 64),
          hdrOff: 0,
          payload: m.bytesAt(block + 64 + indirectBytes, maxPayload),
          segs: Array.from({ length: 1 + segsPer }, () => ({ gpa: 0, len: 0, writable: false })),
        });
      }
      const evBufs: RxBuf[] = [];
      for (let i = 0; i < (opts.eventBuffers ?? LINUX_EVENT_BUFFERS); i++) {
        evBufs.push(buf(m, alloc(8, 8), VIRTIO_VSOCK_EVENT_SIZE));
      }
      return new GuestRings(
        ctx,
        queues,
        setups,
        blocks,
        rxBufs,
        tx,
        evBufs,
        rf.indirect,
        rf.packed,
      );
    } catch (e) {
      for (const b of blocks) m.free(b);
      throw e;
    }
  }

  /** Returns every block of these rings to the allocator. */
  release(): void {
    for (const b of this.blocks) this.ctx.memory.free(b);
  }

  /** virtio_vsock_vqs_start: fill rx and event queues (the caller flushes). */
  fillQueues(): void {
    this.fillRx();
    const ev = this.queues[VSOCK_VQ_EVENT];
    for (let i = 0; i < this.evBufs.length; i++) {
      const head = ev.addBuffer([{
        gpa: this.evBufs[i].gpa,
        len: VIRTIO_VSOCK_EVENT_SIZE,
        writable: true,
      }]);
      if (head < 0) break;
      this.evHead[head] = i;
      this.dirty[VSOCK_VQ_EVENT] = true;
    }
  }

  /** Posts every free rx buffer (like virtio_vsock_rx_fill: until the ring is full). */
  fillRx(): void {
    const rx = this.queues[VSOCK_VQ_RX];
    while (this.rxFree.length > 0) {
      const i = this.rxFree[this.rxFree.length - 1];
      const b = this.rxBufs[i];
      const head = rx.addBuffer([{ gpa: b.gpa, len: b.bytes.length, writable: true }]);
      if (head < 0) break;
      this.rxFree.pop();
      this.rxHead[head] = i;
      this.rxPosted++;
      this.dirty[VSOCK_VQ_RX] = true;
    }
    if (this.rxPosted > this.rxMaxPosted) this.rxMaxPosted = this.rxPosted;
  }

  /** Refills rx by `policy` ("half": once fewer than half are posted, like Linux). */
  maybeRefillRx(starved: boolean): void {
    if (starved || this.rxFree.length === 0) return;
    const policy = this.ctx.opts.rxRefill ?? "half";
    if (policy === "always" || this.rxPosted < this.rxMaxPosted / 2) this.fillRx();
  }

  /** Publishes every queue with new buffers and kicks those whose device asks for it. */
  flush(kick: (index: number) => void): void {
    for (let i = 0; i < VSOCK_VQ_COUNT; i++) {
      if (!this.dirty[i]) continue;
      this.dirty[i] = false;
      const q = this.queues[i];
      q.publish();
      if (q.kickNeeded()) kick(i);
    }
  }

  /** Drains a used ring (`DriverSplitQueue.drainUsed`); raw chains go to `ctx.rawUsed`. */
  #drain(index: number, each: (head: number, len: number) => void): number {
    const raw = this.ctx.rawHeads[index];
    return this.queues[index].drainUsed((head, len) => {
      if (raw.size > 0 && raw.delete(head)) {
        this.ctx.rawUsed.push({ queue: index, head, len });
      } else {
        each(head, len);
      }
    });
  }

  /** Takes back tx buffers the device used. */
  reapTx(): number {
    return this.#drain(VSOCK_VQ_TX, (head, len) => {
      const s = head < this.txHead.length ? this.txHead[head] : -1;
      if (s < 0) {
        this.#anomaly(`tx used ring returned head ${head}, which is not outstanding`);
        return;
      }
      this.txHead[head] = -1;
      this.txFree.push(s);
      if (len !== 0) this.ctx.stats.txUsedNonZeroLen++;
    });
  }

  /** Takes back rx buffers the device filled and hands each to `onBuffer`. */
  reapRx(onBuffer: (b: RxBuf, len: number) => void): number {
    return this.#drain(VSOCK_VQ_RX, (head, len) => {
      const i = head < this.rxHead.length ? this.rxHead[head] : -1;
      if (i < 0) {
        this.#anomaly(`rx used ring returned head ${head}, which is not outstanding`);
        return;
      }
      this.rxHead[head] = -1;
      this.rxFree.push(i);
      this.rxPosted--;
      onBuffer(this.rxBufs[i], len);
    });
  }

  /** Reaps and re-posts event buffers; calls `onReset` after the drain if one was a reset. */
  reapEvents(onReset: () => void): number {
    let reset = false;
    const ev = this.queues[VSOCK_VQ_EVENT];
    const n = this.#drain(VSOCK_VQ_EVENT, (head, len) => {
      const i = head < this.evHead.length ? this.evHead[head] : -1;
      if (i < 0) {
        this.#anomaly(`event used ring returned head ${head}, which is not outstanding`);
        return;
      }
      this.evHead[head] = -1;
      const b = this.evBufs[i];
      if (len < VIRTIO_VSOCK_EVENT_SIZE) {
        this.#anomaly(`event buffer returned with used len ${len} < 4`);
      } else {
        const id = b.view.getUint32(0, true);
        if (id === VIRTIO_VSOCK_EVENT_TRANSPORT_RESET) reset = true;
        else this.#anomaly(`unknown event id ${id}`);
      }
      // virtio_vsock_event_fill_one: re-post at once
      const h = ev.addBuffer([{ gpa: b.gpa, len: VIRTIO_VSOCK_EVENT_SIZE, writable: true }]);
      if (h >= 0) {
        this.evHead[h] = i;
        this.dirty[VSOCK_VQ_EVENT] = true;
      }
    });
    if (reset) onReset();
    return n;
  }

  /** Descriptors a tx packet with `payloadLen` bytes of payload takes. */
  txDescsNeeded(payloadLen: number): number {
    if (payloadLen === 0) return 1;
    const segs = Math.min(this.tx[0].segs.length - 1, payloadLen);
    return this.indirect ? 1 : 1 + segs;
  }

  /** Whether a tx buffer and the descriptors for `payloadLen` bytes are free. */
  hasTxRoom(payloadLen: number): boolean {
    return this.txFree.length > 0 &&
      this.queues[VSOCK_VQ_TX].numFree >= this.txDescsNeeded(payloadLen);
  }

  /**
   * Puts one packet on the tx ring (unpublished): header `h` (its `len` set to `n`) and
   * bytes[off, off+n). Call only after `hasTxRoom(n)`. Returns the tx buffer used, or null
   * when the descriptors could not be added.
   */
  putTx(h: PacketHeader, bytes: Uint8Array | null, off: number, n: number): TxSlot | null {
    const q = this.queues[VSOCK_VQ_TX];
    const slot = this.tx[this.txFree.pop()!];
    h.len = n;
    h.encodeTo(slot.hdrView, slot.hdrOff);
    const segs = slot.segs;
    segs[0].gpa = slot.hdrGpa;
    segs[0].len = VIRTIO_VSOCK_HDR_SIZE;
    segs[0].writable = false;
    let count = 1;
    if (n > 0 && bytes !== null) {
      slot.payload.set(bytes.subarray(off, off + n));
      const k = Math.min(segs.length - 1, n);
      const per = Math.ceil(n / k);
      for (let s = 0, p = 0; p < n; s++, p += per) {
        segs[1 + s].gpa = slot.payloadGpa + p;
        segs[1 + s].len = Math.min(per, n - p);
        segs[1 + s].writable = false;
        count++;
      }
    }
    const chain = count === segs.length ? segs : segs.slice(0, count);
    const head = this.indirect && count > 1
      ? q.addBuffer(chain, slot.indirectGpa)
      : q.addBuffer(chain);
    if (head < 0) {
      this.txFree.push(slot.index);
      return null;
    }
    this.txHead[head] = slot.index;
    this.dirty[VSOCK_VQ_TX] = true;
    this.ctx.stats.txPackets++;
    this.ctx.stats.txBytes += n;
    return slot;
  }

  /**
   * Puts a chain of raw descriptors on queue `index` (unpublished): the descriptor table slots
   * (packed: a buffer id and ring slots) are reserved through the free list, then overwritten
   * verbatim. Returns the head (packed: the buffer id).
   */
  addRawChain(index: number, descs: readonly RawDescriptor[]): number {
    const q = this.queues[index];
    if (q === undefined) throw new RangeError(`no queue ${index}`);
    if (descs.length === 0) throw new RangeError("a raw chain needs at least one descriptor");
    if (q.packed) {
      const id = q.addRawBuffer(descs);
      if (id < 0) throw new GuestConnError(`queue ${index}: ${descs.length} descriptors not free`);
      this.ctx.rawHeads[index].add(id);
      return id;
    }
    const placeholder = descs.map(() => ({ gpa: 0, len: 0, writable: false }));
    const head = q.addBuffer(placeholder);
    if (head < 0) throw new GuestConnError(`queue ${index}: ${descs.length} descriptors not free`);
    const idx = [head];
    for (let k = 1; k < descs.length; k++) {
      const at = q.descGpa + idx[k - 1] * VRING_DESC_SIZE + VRING_DESC_NEXT;
      const b = this.ctx.memory.bytesAt(at, 2);
      idx.push(b[0] | (b[1] << 8));
    }
    for (let k = 0; k < descs.length; k++) {
      const d = descs[k];
      const next = d.nextRaw ??
        (d.next !== undefined ? idx[d.next] ?? d.next : (k + 1 < descs.length ? idx[k + 1] : 0));
      q.writeDesc(idx[k], d.addr, d.len, d.flags, next);
    }
    this.ctx.rawHeads[index].add(head);
    return head;
  }

  /** One line per queue plus the buffer counts (for `VsockGuest.describe`). */
  describe(lines: string[], rxStarved: boolean, backlog: number): void {
    const stats = this.ctx.stats;
    const names = ["rx", "tx", "event"];
    for (let i = 0; i < VSOCK_VQ_COUNT; i++) {
      const q = this.queues[i];
      const at = (pos: number) => describePosition(q, pos);
      lines.push(
        `  ${names[i]}: avail ${at(q.availIdx)} used ${at(q.readUsedIdx())} ` +
          `reaped ${at(q.lastUsed)} ` +
          `free descs ${q.numFree} kicks ${stats.kicks[i]} interrupts ${stats.interrupts[i]}`,
      );
    }
    lines.push(
      `  rx posted ${this.rxPosted}/${this.rxBufs.length}${rxStarved ? " (starved)" : ""}, ` +
        `tx buffers free ${this.txFree.length}/${this.tx.length}, backlog ${backlog}`,
    );
  }

  #anomaly(what: string): void {
    this.ctx.anomalies.push(what);
  }
}

function buf(memory: GuestRam, gpa: number, len: number): RxBuf {
  const bytes = memory.bytesAt(gpa, len);
  return { gpa, bytes, view: new DataView(bytes.buffer, bytes.byteOffset, len) };
}
