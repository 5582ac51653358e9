/**
 * A tiny packed-virtqueue device for the driver tests (driver_packed_queue_test.ts,
 * guest_rings_packed_test.ts), written from the spec (virtio 1.3 section 2.8) with
 * packed_layout's helpers, independent of the back end's device code: available descriptors
 * read in ring order (chains and indirect tables walked), used descriptors written with
 * usedFlags(wrap) (flags last) and the used position skipped by the buffer's slot count, the
 * used buffer notification decided by the driver event suppression structure, and the device
 * event suppression structure written on request. It addresses guest memory region 0, which
 * must start at gpa 0.
 */

import assert from "node:assert/strict";
import type { GuestMemory } from "../../lib/virtio/memory.ts";
import {
  isAvailable,
  PACKED_DESC_ADDR,
  PACKED_DESC_FLAGS,
  PACKED_DESC_ID,
  PACKED_DESC_LEN,
  PACKED_DESC_SIZE,
  PACKED_EVENT_FLAGS,
  PACKED_EVENT_OFF_WRAP,
  packedNeedEvent,
  type PackedRingAddrs,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  usedFlags,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
} from "../../lib/virtio/packed_layout.ts";

/** One element of a buffer as the device sees it. */
export interface Seg {
  readonly addr: number;
  readonly len: number;
  readonly writable: boolean;
}

/** A buffer the device took: its id, the ring slots it occupied and its segments. */
export interface Taken {
  readonly id: number;
  readonly slots: number;
  readonly segs: Seg[];
}

/** The device side, as small as the spec allows. */
export class TinyDevice {
  availIdx = 0;
  availWrap = 1;
  usedIdx = 0;
  usedWrap = 1;
  /** used slots written since the last notification decision */
  #usedSince = 0;
  readonly #v: DataView;

  constructor(
    readonly mem: GuestMemory,
    readonly size: number,
    readonly l: PackedRingAddrs,
  ) {
    assert.equal(mem.regions[0].gpa, 0, "the tiny device addresses region 0 at gpa 0");
    this.#v = mem.regions[0].view;
  }

  #desc(slot: number) {
    const o = this.l.descGpa + slot * PACKED_DESC_SIZE;
    return {
      addr: Number(this.#v.getBigUint64(o + PACKED_DESC_ADDR, true)),
      len: this.#v.getUint32(o + PACKED_DESC_LEN, true),
      id: this.#v.getUint16(o + PACKED_DESC_ID, true),
      flags: this.#v.getUint16(o + PACKED_DESC_FLAGS, true),
    };
  }

  /** The next available buffer (chain or indirect table), or null. */
  take(): Taken | null {
    if (!isAvailable(this.#desc(this.availIdx).flags, this.availWrap)) return null;
    const segs: Seg[] = [];
    let slots = 0;
    for (;;) {
      const d = this.#desc(this.availIdx);
      assert.ok(isAvailable(d.flags, this.availWrap), `slot ${this.availIdx} of a chain available`);
      slots++;
      if (++this.availIdx === this.size) {
        this.availIdx = 0;
        this.availWrap ^= 1;
      }
      if (d.flags & VIRTQ_DESC_F_INDIRECT) {
        for (let o = d.addr; o < d.addr + d.len; o += PACKED_DESC_SIZE) {
          const f = this.#v.getUint16(o + PACKED_DESC_FLAGS, true);
          assert.equal(f & ~VIRTQ_DESC_F_WRITE, 0, "only WRITE in an indirect table");
          segs.push({
            addr: Number(this.#v.getBigUint64(o + PACKED_DESC_ADDR, true)),
            len: this.#v.getUint32(o + PACKED_DESC_LEN, true),
            writable: (f & VIRTQ_DESC_F_WRITE) !== 0,
          });
        }
      } else {
        segs.push({ addr: d.addr, len: d.len, writable: (d.flags & VIRTQ_DESC_F_WRITE) !== 0 });
      }
      if ((d.flags & VIRTQ_DESC_F_NEXT) === 0) return { id: d.id, slots, segs };
    }
  }

  /** Takes every available buffer. */
  takeAll(): Taken[] {
    const out: Taken[] = [];
    for (let t = this.take(); t !== null; t = this.take()) out.push(t);
    return out;
  }

  /** Writes a used descriptor for `t` (flags last) and skips its slots. */
  use(t: Taken, len: number, write = len > 0): void {
    const o = this.l.descGpa + this.usedIdx * PACKED_DESC_SIZE;
    this.#v.setUint16(o + PACKED_DESC_ID, t.id, true);
    this.#v.setUint32(o + PACKED_DESC_LEN, len, true);
    this.#v.setUint16(
      o + PACKED_DESC_FLAGS,
      usedFlags(this.usedWrap) | (write ? VIRTQ_DESC_F_WRITE : 0),
      true,
    );
    this.usedIdx += t.slots;
    this.#usedSince += t.slots;
    if (this.usedIdx >= this.size) {
      this.usedIdx -= this.size;
      this.usedWrap ^= 1;
    }
  }

  /** Writes a used descriptor with any id at the next used slot, advancing by one. */
  useRawId(id: number, len: number): void {
    this.use({ id, slots: 1, segs: [] }, len);
  }

  /** Whether the driver wants a used buffer notification for what was used since last asked. */
  notifyNeeded(): boolean {
    const since = this.#usedSince;
    this.#usedSince = 0;
    const flags = this.#v.getUint16(this.l.driverEventGpa + PACKED_EVENT_FLAGS, true);
    if (flags === RING_EVENT_FLAGS_DISABLE) return false;
    if (flags === RING_EVENT_FLAGS_ENABLE) return true;
    const ev = this.#v.getUint16(this.l.driverEventGpa + PACKED_EVENT_OFF_WRAP, true);
    return packedNeedEvent(ev, this.usedIdx, this.usedIdx - since, this.usedWrap, this.size);
  }

  /** Writes the device event suppression structure. */
  suppress(flags: number, offWrapWord = 0): void {
    this.#v.setUint16(this.l.deviceEventGpa + PACKED_EVENT_OFF_WRAP, offWrapWord, true);
    this.#v.setUint16(this.l.deviceEventGpa + PACKED_EVENT_FLAGS, flags, true);
  }
}
