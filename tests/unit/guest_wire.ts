/**
 * A wire between two testing-guest transports (guest_transport.ts) without a back end: each
 * end has its own rings in guest RAM; a test-side device consumes each end's tx ring (used
 * len 0, as a device must) and hands every packet it saw there to the other end's receive
 * path, optionally rewritten (e.g. split into 4 KiB rx buffers, as a back end with Linux's
 * rx buffers must). The driver's guest side is thus tested against itself and against packet
 * captures, before any back end speaks SEQPACKET or DGRAM.
 */
import { featureMask, VIRTIO_F_VERSION_1 } from "../../lib/virtio/features.ts";
import { DescChain } from "../../lib/virtio/desc_chain.ts";
import { SplitQueue } from "../../lib/virtio/split_queue.ts";
import { POP_EMPTY } from "../../lib/virtio/virtqueue.ts";
import {
  VIRTIO_VSOCK_F_DGRAM,
  VIRTIO_VSOCK_F_SEQPACKET,
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_OP_RW,
  VSOCK_VQ_TX,
} from "../../lib/vsock/constants.ts";
import { PacketHeader } from "../../lib/vsock/packet.ts";
import { GuestRam } from "../../lib/testing/guest_ram.ts";
import { GuestRings, type RxBuf } from "../../lib/testing/guest_rings.ts";
import { GuestTransport } from "../../lib/testing/guest_transport.ts";
import { GuestTimeoutError } from "../../lib/testing/guest_wait.ts";
import {
  type CapturedPacket,
  type GuestStats,
  newGuestStats,
  type PacketCapture,
  type VsockGuestOptions,
} from "../../lib/testing/guest_types.ts";

/** VERSION_1 + SEQPACKET + DGRAM: what the wire's ends negotiate by default. */
export const WIRE_FEATURES: bigint = featureMask(VIRTIO_F_VERSION_1) |
  featureMask(VIRTIO_VSOCK_F_SEQPACKET) | featureMask(VIRTIO_VSOCK_F_DGRAM);

const QUEUE_SIZE = 64;

/** A header from guest a (CID 3) to guest b (CID 4) with `fields` set (for raw packets). */
export function wireHeader(fields: Partial<PacketHeader>): PacketHeader {
  return Object.assign(new PacketHeader(), { srcCid: 3, dstCid: 4 }, fields);
}

/** Rewrites a packet in flight: return the packets to deliver instead (none = dropped). */
export type WireRewrite = (p: CapturedPacket) => CapturedPacket[];

/** One guest on the wire. */
export class WireEnd {
  readonly stats: GuestStats = newGuestStats();
  readonly anomalies: string[] = [];
  readonly rings: GuestRings;
  readonly transport: GuestTransport;
  /** every packet this end put on its tx ring or received (the wire reads the tx ones) */
  readonly capture: PacketCapture;
  readonly #txDev: SplitQueue;
  readonly #chain = new DescChain(QUEUE_SIZE);
  #forwarded = 0;

  constructor(
    memory: GuestRam,
    readonly cid: number,
    readonly opts: VsockGuestOptions,
    readonly features: bigint,
    waitFor: (pred: () => boolean, timeoutMs: number, what: string) => Promise<void>,
  ) {
    this.rings = GuestRings.alloc(
      {
        memory,
        opts,
        stats: this.stats,
        anomalies: this.anomalies,
        rawHeads: [new Set(), new Set(), new Set()],
        rawUsed: [],
      },
      QUEUE_SIZE,
      features,
    );
    const s = this.rings.setups[VSOCK_VQ_TX];
    this.#txDev = new SplitQueue(s.size, memory, s.descGpa, s.availGpa, s.usedGpa, {
      eventIdx: false,
      indirect: false,
    });
    this.transport = new GuestTransport({
      opts,
      stats: this.stats,
      anomalies: this.anomalies,
      timeoutMs: opts.timeoutMs ?? 5000,
      closeTimeoutMs: opts.closeTimeoutMs ?? 1000,
      rings: () => this.rings,
      cid: () => this.cid,
      features: () => this.features,
      checkUsable: () => {},
      flush: () => this.rings.flush(() => {}),
      waitFor,
    });
    this.capture = this.transport.capture();
  }

  /** Packets this end sent. */
  sent(): CapturedPacket[] {
    return this.capture.packets.filter((p) => p.direction === "tx");
  }

  /** Packets this end received. */
  received(): CapturedPacket[] {
    return this.capture.packets.filter((p) => p.direction === "rx");
  }

  /** The device side: returns consumed tx chains; yields the tx packets not forwarded yet. */
  _takeTx(): CapturedPacket[] {
    let n = 0;
    while (this.#txDev.pop(this.#chain) !== POP_EMPTY) {
      this.#txDev.pushUsed(this.#chain.head, 0);
      n++;
    }
    if (n > 0) this.#txDev.publishUsed();
    this.rings.reapTx();
    const out: CapturedPacket[] = [];
    const all = this.capture.packets;
    for (; this.#forwarded < all.length; this.#forwarded++) {
      if (all[this.#forwarded].direction === "tx") out.push(all[this.#forwarded]);
    }
    return out;
  }
}

/** Two guests (CIDs 3 and 4) joined by a wire. */
export class Wire {
  readonly memory = new GuestRam({});
  readonly a: WireEnd;
  readonly b: WireEnd;
  /** rewrites packets in flight (default: delivered as sent) */
  rewrite: WireRewrite = (p) => [p];
  /** while true, packets from a to b stay on the wire (b's credit updates still flow) */
  holdAtoB = false;
  readonly #held: CapturedPacket[] = [];
  readonly #rxBytes = new Uint8Array(VIRTIO_VSOCK_HDR_SIZE + 65536);
  readonly #rxBuf: RxBuf = {
    gpa: 0,
    bytes: this.#rxBytes,
    view: new DataView(this.#rxBytes.buffer),
  };

  constructor(
    opts: { a?: VsockGuestOptions; b?: VsockGuestOptions; features?: bigint } = {},
  ) {
    const f = opts.features ?? WIRE_FEATURES;
    const wait = (pred: () => boolean, ms: number, what: string) => this.waitFor(pred, ms, what);
    this.a = new WireEnd(this.memory, 3, opts.a ?? {}, f, wait);
    this.b = new WireEnd(this.memory, 4, opts.b ?? {}, f, wait);
  }

  /** Moves every packet across until nothing moves. */
  pump(): void {
    for (let moved = true; moved;) {
      moved = false;
      const ab = this.a._takeTx();
      const ba = this.b._takeTx();
      this.#held.push(...ab);
      if (!this.holdAtoB) {
        for (const p of this.#held.splice(0)) moved = this.#deliver(this.b, p) || moved;
      }
      for (const p of ba) moved = this.#deliver(this.a, p) || moved;
      for (const e of [this.a, this.b]) {
        e.transport.drainBacklog();
        e.rings.flush(() => {});
      }
      moved ||= ab.length > 0 || ba.length > 0;
    }
  }

  /** Pumps until `pred` holds; GuestTimeoutError after `timeoutMs`. */
  async waitFor(pred: () => boolean, timeoutMs = 5000, what = "a condition"): Promise<void> {
    const end = performance.now() + timeoutMs;
    for (;;) {
      this.pump();
      if (pred()) return;
      if (performance.now() >= end) throw new GuestTimeoutError(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 1));
    }
  }

  close(): void {
    this.memory.close();
  }

  #deliver(to: WireEnd, p: CapturedPacket): boolean {
    let any = false;
    for (const q of this.rewrite(p)) {
      const h = new PacketHeader().copyFrom(q.header);
      h.len = q.payload.length;
      h.encodeTo(this.#rxBuf.view, 0);
      this.#rxBytes.set(q.payload, VIRTIO_VSOCK_HDR_SIZE);
      to.transport.onRxBuffer(this.#rxBuf, VIRTIO_VSOCK_HDR_SIZE + q.payload.length);
      any = true;
    }
    return any;
  }
}

/**
 * A rewrite that splits every RW packet into pieces of at most `size` bytes, the flags only
 * on the last piece (what a back end filling Linux's 4 KiB rx buffers must do for SEQPACKET).
 */
export function splitRw(size: number): WireRewrite {
  return (p) => {
    if (p.header.op !== VIRTIO_VSOCK_OP_RW || p.payload.length <= size) return [p];
    const out: CapturedPacket[] = [];
    for (let off = 0; off < p.payload.length; off += size) {
      const end = Math.min(off + size, p.payload.length);
      const header = new PacketHeader().copyFrom(p.header);
      if (end < p.payload.length) header.flags = 0;
      out.push({ direction: p.direction, header, payload: p.payload.subarray(off, end) });
    }
    return out;
  };
}
