/**
 * The virtqueues of the benchmark's guest (lean_guest.ts), laid out like Linux's
 * `net/vmw_vsock/virtio_transport.c` does it, but with the payload never copied by the guest,
 * the way a kernel driver hands the device pages it already has. The rings are split, or packed
 * when VIRTIO_F_RING_PACKED was acked (the bench's `--packed`), both laid out by
 * `lib/testing/driver_rings.ts`:
 *
 * - a **payload pool** (`pool`, at `poolGpa`): the benchmark pattern (pattern.ts), written into
 *   guest RAM once at boot. An RW packet's payload descriptor points into it at the stream's
 *   offset, so sending costs a header and two descriptors, never a copy;
 * - **tx slots**: per packet in flight a 44-byte header, a two-entry indirect table (header +
 *   payload, as `virtqueue_add_sgs` builds when INDIRECT_DESC is negotiated and the packet has
 *   payload; header-only packets use one direct descriptor) and a small inline area for
 *   payload that is not in the pool (echo replies, stream headers);
 * - **rx buffers**: one device-writable descriptor of 44 + `rxBufSize` bytes each (Linux posts
 *   44 + 4096), re-posted as they are, without copying, once fewer than half are posted
 *   (`virtio_vsock_rx_fill` from the rx worker);
 * - **event buffers**: 8 of 4 bytes, re-posted at once.
 *
 * Used rings are drained with callbacks disabled, then re-enabled with a re-check
 * (`virtqueue_enable_cb`); kicks follow `virtqueue_kick_prepare` (both in `DriverSplitQueue` /
 * `DriverPackedQueue`, which allocate nothing per packet).
 */

import type { DriverQueue, DriverSegment } from "../../lib/testing/driver_queue.ts";
import { allocDriverRing, describePosition } from "../../lib/testing/driver_rings.ts";
import type { QueueSetup } from "../../lib/testing/front_end.ts";
import type { GuestRam } from "../../lib/testing/guest_ram.ts";
import {
  VIRTIO_VSOCK_EVENT_SIZE,
  VIRTIO_VSOCK_HDR_SIZE,
  VSOCK_VQ_COUNT,
  VSOCK_VQ_EVENT,
  VSOCK_VQ_RX,
  VSOCK_VQ_TX,
} from "../../lib/vsock/constants.ts";

/** Bytes of a tx slot's inline payload area (payload that is not in the pool). */
export const INLINE_MAX = 4096;
/** Linux's `event_list` size. */
const EVENT_BUFFERS = 8;
/** Bytes reserved for a tx slot's header (44, rounded to a cache line). */
const SLOT_HDR_BYTES = 64;
/** Bytes reserved for a tx slot's indirect table (two 16-byte descriptors, rounded). */
const SLOT_INDIRECT_BYTES = 64;

/** A preallocated tx slot. */
interface TxSlot {
  readonly hdrGpa: number;
  readonly hdrView: DataView;
  readonly indirectGpa: number;
  readonly inlineGpa: number;
  readonly inline: Uint8Array;
  /** header + payload (payload gpa/len rewritten per packet) */
  readonly data: [DriverSegment, { gpa: number; len: number; writable: boolean }];
  /** header only */
  readonly control: [DriverSegment];
}

/** The rings, the payload pool and every buffer, in guest RAM. */
export class LeanRings {
  readonly queues: DriverQueue[] = [];
  readonly setups: QueueSetup[] = [];
  readonly indirect: boolean;
  /** the payload pool as the guest sees it */
  readonly pool: Uint8Array;
  readonly poolGpa: number;
  readonly rxBufSize: number;
  /** rx buffers: bytes (header + payload) and a DataView over each */
  readonly rxBytes: Uint8Array[] = [];
  readonly rxViews: DataView[] = [];
  rxPosted = 0;
  readonly #rxSegs: DriverSegment[][] = [];
  /** per descriptor head: rx buffer / tx slot / event buffer index, -1 when not ours */
  readonly #rxOf: Int32Array;
  readonly #txOf: Int32Array;
  readonly #evOf: Int32Array;
  readonly #rxFree: number[] = [];
  readonly #tx: TxSlot[] = [];
  readonly #txFree: number[] = [];
  readonly #evBufs: { gpa: number; view: DataView; seg: DriverSegment[] }[] = [];
  readonly #dirty = [false, false, false];

  constructor(
    mem: GuestRam,
    size: number,
    opts: {
      packed: boolean;
      eventIdx: boolean;
      indirect: boolean;
      rxBufSize: number;
      pool: Uint8Array;
    },
  ) {
    this.indirect = opts.indirect;
    this.rxBufSize = opts.rxBufSize;
    const alloc = (bytes: number, align: number) => mem.alloc(bytes, align);
    for (let i = 0; i < VSOCK_VQ_COUNT; i++) {
      const ring = allocDriverRing(mem, alloc, i, size, opts);
      this.queues.push(ring.queue);
      this.setups.push(ring.setup);
    }
    this.#rxOf = new Int32Array(size).fill(-1);
    this.#txOf = new Int32Array(size).fill(-1);
    this.#evOf = new Int32Array(size).fill(-1);
    this.poolGpa = mem.alloc(opts.pool.length, 4096);
    this.pool = mem.bytesAt(this.poolGpa, opts.pool.length);
    this.pool.set(opts.pool);
    const rxLen = VIRTIO_VSOCK_HDR_SIZE + opts.rxBufSize;
    for (let i = 0; i < size; i++) {
      const gpa = mem.alloc(rxLen, 64);
      const bytes = mem.bytesAt(gpa, rxLen);
      this.rxBytes.push(bytes);
      this.rxViews.push(new DataView(bytes.buffer, bytes.byteOffset, rxLen));
      this.#rxSegs.push([{ gpa, len: rxLen, writable: true }]);
      this.#rxFree.push(i);
    }
    for (let i = 0; i < size; i++) {
      const block = mem.alloc(SLOT_HDR_BYTES + SLOT_INDIRECT_BYTES + INLINE_MAX, 64);
      const hdr = mem.bytesAt(block, SLOT_HDR_BYTES);
      const inlineGpa = block + SLOT_HDR_BYTES + SLOT_INDIRECT_BYTES;
      const header = { gpa: block, len: VIRTIO_VSOCK_HDR_SIZE, writable: false };
      this.#tx.push({
        hdrGpa: block,
        hdrView: new DataView(hdr.buffer, hdr.byteOffset, SLOT_HDR_BYTES),
        indirectGpa: block + SLOT_HDR_BYTES,
        inlineGpa,
        inline: mem.bytesAt(inlineGpa, INLINE_MAX),
        data: [header, { gpa: 0, len: 0, writable: false }],
        control: [header],
      });
      this.#txFree.push(size - 1 - i);
    }
    for (let i = 0; i < EVENT_BUFFERS; i++) {
      const gpa = mem.alloc(8, 8);
      const b = mem.bytesAt(gpa, VIRTIO_VSOCK_EVENT_SIZE);
      this.#evBufs.push({
        gpa,
        view: new DataView(b.buffer, b.byteOffset, VIRTIO_VSOCK_EVENT_SIZE),
        seg: [{ gpa, len: VIRTIO_VSOCK_EVENT_SIZE, writable: true }],
      });
    }
  }

  /** virtio_vsock_vqs_start: fill the rx and event queues (the caller flushes). */
  fill(): void {
    this.fillRx();
    const ev = this.queues[VSOCK_VQ_EVENT];
    for (let i = 0; i < this.#evBufs.length; i++) {
      const head = ev.addBuffer(this.#evBufs[i].seg);
      if (head < 0) break;
      this.#evOf[head] = i;
    }
    this.#dirty[VSOCK_VQ_EVENT] = true;
  }

  /** Posts every free rx buffer (virtio_vsock_rx_fill). */
  fillRx(): void {
    const rx = this.queues[VSOCK_VQ_RX];
    while (this.#rxFree.length > 0) {
      const i = this.#rxFree[this.#rxFree.length - 1];
      const head = rx.addBuffer(this.#rxSegs[i]);
      if (head < 0) break;
      this.#rxFree.pop();
      this.#rxOf[head] = i;
      this.rxPosted++;
      this.#dirty[VSOCK_VQ_RX] = true;
    }
  }

  /** Linux's refill policy: once fewer than half of the buffers are posted. */
  maybeRefillRx(): void {
    if (this.rxPosted < this.rxBytes.length / 2) this.fillRx();
  }

  /** Whether a packet (with payload or header-only) can be put on the tx ring now. */
  txRoom(withPayload: boolean): boolean {
    return this.#txFree.length > 0 &&
      this.queues[VSOCK_VQ_TX].numFree >= (withPayload && !this.indirect ? 2 : 1);
  }

  /**
   * Takes a free tx slot for one packet; returns its header view (write the header there,
   * then call `putTx`). Call only after `txRoom`.
   */
  txSlot(): number {
    return this.#txFree.pop()!;
  }

  /** The header view of slot `s`. */
  txHeader(s: number): DataView {
    return this.#tx[s].hdrView;
  }

  /** The inline payload area of slot `s` and its gpa. */
  txInline(s: number): Uint8Array {
    return this.#tx[s].inline;
  }

  /**
   * Chains slot `s` (header already written) with `len` payload bytes at `gpa` (none when
   * len is 0; `gpa` -1 means the slot's inline area) on the tx ring, unpublished.
   */
  putTx(s: number, gpa: number, len: number): void {
    const slot = this.#tx[s];
    const q = this.queues[VSOCK_VQ_TX];
    let head: number;
    if (len === 0) head = q.addBuffer(slot.control);
    else {
      const p = slot.data[1];
      p.gpa = gpa < 0 ? slot.inlineGpa : gpa;
      p.len = len;
      head = this.indirect ? q.addBuffer(slot.data, slot.indirectGpa) : q.addBuffer(slot.data);
    }
    if (head < 0) throw new Error("tx ring full after txRoom() said otherwise");
    this.#txOf[head] = s;
    this.#dirty[VSOCK_VQ_TX] = true;
  }

  /** Takes back the tx slots the device used; returns how many. */
  reapTx(anomaly: (what: string) => void): number {
    return this.#drain(VSOCK_VQ_TX, (head) => {
      const s = this.#txOf[head];
      if (s < 0) return anomaly(`tx used ring returned head ${head}, which is not outstanding`);
      this.#txOf[head] = -1;
      this.#txFree.push(s);
    });
  }

  /** Takes back the rx buffers the device filled: `each(buffer index, used len)`. */
  reapRx(each: (i: number, len: number) => void, anomaly: (what: string) => void): number {
    return this.#drain(VSOCK_VQ_RX, (head, len) => {
      const i = this.#rxOf[head];
      if (i < 0) return anomaly(`rx used ring returned head ${head}, which is not outstanding`);
      this.#rxOf[head] = -1;
      this.rxPosted--;
      each(i, len);
      this.#rxFree.push(i);
    });
  }

  /** Reaps and re-posts event buffers; `each(event id)`. */
  reapEvents(each: (id: number) => void): number {
    const ev = this.queues[VSOCK_VQ_EVENT];
    return this.#drain(VSOCK_VQ_EVENT, (head, len) => {
      const i = this.#evOf[head];
      if (i < 0) return;
      this.#evOf[head] = -1;
      const b = this.#evBufs[i];
      each(len >= VIRTIO_VSOCK_EVENT_SIZE ? b.view.getUint32(0, true) : -1);
      const h = ev.addBuffer(b.seg);
      if (h >= 0) this.#evOf[h] = i;
      this.#dirty[VSOCK_VQ_EVENT] = true;
    });
  }

  /** Publishes every queue with new buffers and kicks those whose device asks for it. */
  flush(kick: (index: number) => void): void {
    for (let i = 0; i < VSOCK_VQ_COUNT; i++) {
      if (!this.#dirty[i]) continue;
      this.#dirty[i] = false;
      const q = this.queues[i];
      q.publish();
      if (q.kickNeeded()) kick(i);
    }
  }

  /** Drains a used ring (`DriverQueue.drainUsed`), ignoring out-of-range heads. */
  #drain(index: number, each: (head: number, len: number) => void): number {
    const q = this.queues[index];
    return q.drainUsed((head, len) => {
      if (head < q.size) each(head, len);
    });
  }

  /** One line per queue (for stall messages). */
  describe(): string {
    const names = ["rx", "tx", "event"];
    return this.queues.map((q, i) => {
      const at = (pos: number) => describePosition(q, pos);
      return `${names[i]}: avail ${at(q.availIdx)} used ${at(q.readUsedIdx())} ` +
        `reaped ${at(q.lastUsed)} free descs ${q.numFree}`;
    }).join("; ") + `; rx posted ${this.rxPosted}, tx slots free ${this.#txFree.length}`;
  }
}
