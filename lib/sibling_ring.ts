/**
 * A single-producer single-consumer byte ring in shared memory, carrying sibling packets
 * (`vsock/sibling_hub.ts` SiblingPacket: header fields + payload) from the reactor of one
 * worker process to the reactor of another.
 *
 * Layout of one ring (all little endian, at `base` in a memfd both processes map):
 *
 *     0   u32 head   bytes consumed (free-running, written by the consumer only)
 *     64  u32 tail   bytes produced (free-running, written by the producer only)
 *     128 data       `capacity` bytes (a power of two), records back to back
 *
 * A record is `RECORD_HEADER_SIZE` bytes (its padded length, srcCid, dstCid, srcPort,
 * dstPort, type | op << 16, flags, bufAlloc, fwdCnt, payload length) followed by the payload,
 * padded to 8 bytes. A record never wraps: when it does not fit before the end of the data
 * area the producer writes a `WRAP` marker and starts again at offset 0.
 *
 * No locks: head and tail are read and written with Atomics (sequentially consistent), the
 * producer publishes `tail` only after the record's bytes are written, the consumer publishes
 * `head` only after it copied the record out. A full ring refuses the record (the caller
 * gives the sending guest an RST, as a full local inbox does). Wake-ups: after publishing,
 * the producer reads `head`; if the consumer had caught up with the old tail it may be
 * asleep, so `push` returns true in `wake` and the caller writes the consumer's eventfd.
 * (The consumer re-reads `tail` after publishing `head` before it sleeps, so one of the two
 * always sees the other's write.)
 */
import type { SiblingPacket } from "./vsock/sibling_hub.ts";

export const RING_HEAD = 0;
export const RING_TAIL = 16; // Int32 index of byte offset 64: its own cache line
/** Bytes before the data area of a ring. */
export const RING_CONTROL_SIZE = 128;
/** Fixed part of a record. */
export const RECORD_HEADER_SIZE = 40;
/** Record length that means "skip to offset 0". */
const WRAP = 0xffffffff;
const ALIGN = 8;

/** Bytes one ring of `capacity` data bytes takes in the shared file. */
export function ringBytes(capacity: number): number {
  return RING_CONTROL_SIZE + capacity;
}

/** One direction of a link, over `buffer` (an ArrayBuffer of a shared mapping) at `base`. */
export class SiblingRing {
  readonly #ctl: Int32Array;
  readonly #data: Uint8Array;
  readonly #view: DataView;
  readonly #mask: number;
  /** the producer's (or consumer's) own position, mirrored in shared memory */
  #pos: number;

  constructor(
    buffer: ArrayBuffer,
    base: number,
    readonly capacity: number,
    readonly role: "producer" | "consumer",
  ) {
    if ((capacity & (capacity - 1)) !== 0 || capacity < 4096) {
      throw new Error(`ring capacity ${capacity} is not a power of two >= 4096`);
    }
    this.#ctl = new Int32Array(buffer, base, RING_CONTROL_SIZE / 4);
    this.#data = new Uint8Array(buffer, base + RING_CONTROL_SIZE, capacity);
    this.#view = new DataView(buffer, base + RING_CONTROL_SIZE, capacity);
    this.#mask = capacity - 1;
    this.#pos = Atomics.load(this.#ctl, role === "producer" ? RING_TAIL : RING_HEAD) >>> 0;
  }

  /** The largest payload a record may carry. */
  get maxPayload(): number {
    return (this.capacity >>> 1) - RECORD_HEADER_SIZE;
  }

  /** Bytes produced and not yet consumed. */
  get used(): number {
    return (Atomics.load(this.#ctl, RING_TAIL) - Atomics.load(this.#ctl, RING_HEAD)) >>> 0;
  }

  /**
   * Appends `p` (from `p.offset` on). Returns 0 when the ring is full (nothing written),
   * 1 when written, 2 when written and the consumer may be asleep (write its eventfd).
   */
  push(p: SiblingPacket): 0 | 1 | 2 {
    const payload = p.payload;
    const len = payload === null ? 0 : payload.length - p.offset;
    if (len > this.maxPayload) return 0;
    const need = (RECORD_HEADER_SIZE + len + ALIGN - 1) & ~(ALIGN - 1);
    const start = this.#pos;
    const head = Atomics.load(this.#ctl, RING_HEAD) >>> 0;
    const free = this.capacity - ((start - head) >>> 0);
    let off = start & this.#mask;
    const toEnd = this.capacity - off;
    let tail = start;
    if (toEnd < need) {
      if (free < toEnd + need) return 0;
      this.#view.setUint32(off, WRAP, true);
      tail = (tail + toEnd) >>> 0;
      off = 0;
    } else if (free < need) return 0;
    const v = this.#view;
    v.setUint32(off, need, true);
    v.setUint32(off + 4, p.srcCid, true);
    v.setUint32(off + 8, p.dstCid, true);
    v.setUint32(off + 12, p.srcPort, true);
    v.setUint32(off + 16, p.dstPort, true);
    v.setUint32(off + 20, (p.type & 0xffff) | ((p.op & 0xffff) << 16), true);
    v.setUint32(off + 24, p.flags, true);
    v.setUint32(off + 28, p.bufAlloc, true);
    v.setUint32(off + 32, p.fwdCnt, true);
    v.setUint32(off + 36, len, true);
    if (len > 0) this.#data.set(payload!.subarray(p.offset), off + RECORD_HEADER_SIZE);
    tail = (tail + need) >>> 0;
    this.#pos = tail;
    Atomics.store(this.#ctl, RING_TAIL, tail | 0);
    return (Atomics.load(this.#ctl, RING_HEAD) >>> 0) === start ? 2 : 1;
  }

  /**
   * Hands each waiting record, oldest first, to `deliver` (as a fresh SiblingPacket owning a
   * copy of the payload) until the ring is empty (returns "empty") or `deliver` refuses one
   * (returns "blocked": the record stays, to be offered again). A corrupt record (a peer that
   * died mid-write is replaced before this can happen, so only a bug) returns "corrupt".
   */
  drain(deliver: (p: SiblingPacket) => boolean): "empty" | "blocked" | "corrupt" {
    let head = this.#pos;
    for (;;) {
      const tail = Atomics.load(this.#ctl, RING_TAIL) >>> 0;
      if (head === tail) return "empty";
      while (head !== tail) {
        const off = head & this.#mask;
        const need = this.#view.getUint32(off, true);
        if (need === WRAP) {
          head = (head + this.capacity - off) >>> 0;
          continue;
        }
        const avail = (tail - head) >>> 0;
        if (need < RECORD_HEADER_SIZE || need > avail || off + need > this.capacity) {
          return "corrupt";
        }
        if (!deliver(this.#read(off))) {
          this.#publish(head);
          return "blocked";
        }
        head = (head + need) >>> 0;
        this.#publish(head);
      }
    }
  }

  #publish(head: number): void {
    this.#pos = head;
    Atomics.store(this.#ctl, RING_HEAD, head | 0);
  }

  #read(off: number): SiblingPacket {
    const v = this.#view;
    const typeOp = v.getUint32(off + 20, true);
    const len = Math.min(v.getUint32(off + 36, true), v.getUint32(off, true) - RECORD_HEADER_SIZE);
    const start = off + RECORD_HEADER_SIZE;
    return {
      srcCid: v.getUint32(off + 4, true),
      dstCid: v.getUint32(off + 8, true),
      srcPort: v.getUint32(off + 12, true),
      dstPort: v.getUint32(off + 16, true),
      type: typeOp & 0xffff,
      op: typeOp >>> 16,
      flags: v.getUint32(off + 24, true),
      bufAlloc: v.getUint32(off + 28, true),
      fwdCnt: v.getUint32(off + 32, true),
      payload: len > 0 ? this.#data.slice(start, start + len) : null,
      offset: 0,
    };
  }
}
