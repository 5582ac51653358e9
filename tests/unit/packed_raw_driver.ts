/**
 * A minimal raw driver of a packed virtqueue (virtio 1.3 "Packed Virtqueues": "Supplying
 * Buffers to The Device" and "Receiving Used Buffers From The Device"), for the device-side tests of
 * `PackedQueue`: it writes descriptors byte by byte with packed_layout.ts's offsets and flags,
 * the first descriptor's flags last, keeps the descriptor count of each buffer id to skip over
 * used descriptors, and reads and writes the event suppression structures. It checks nothing
 * the device does: the tests do.
 */

import type { GuestMemory } from "../../lib/virtio/memory.ts";
import {
  availFlags,
  isUsed,
  PACKED_DESC_ADDR,
  PACKED_DESC_FLAGS,
  PACKED_DESC_ID,
  PACKED_DESC_LEN,
  PACKED_DESC_SIZE,
  PACKED_EVENT_FLAGS,
  PACKED_EVENT_OFF_WRAP,
  type PackedRingAddrs,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
} from "../../lib/virtio/packed_layout.ts";

/** One buffer element; `flags` are ORed into the descriptor's (e.g. INDIRECT, a stray NEXT). */
export interface RawSeg {
  readonly gpa: number;
  readonly len: number;
  readonly writable?: boolean;
  readonly flags?: number;
}

export const rd = (gpa: number, len: number): RawSeg => ({ gpa, len });
export const wr = (gpa: number, len: number): RawSeg => ({ gpa, len, writable: true });

/** A descriptor as it lies in the ring. */
export interface RawDesc {
  readonly addr: number;
  readonly len: number;
  readonly id: number;
  readonly flags: number;
}

export class RawPackedDriver {
  nextAvail = 0;
  availWrap = 1;
  nextUsed = 0;
  usedWrap = 1;
  /** ring descriptors of each buffer id made available and not yet seen used */
  readonly sgs = new Map<number, number>();
  #heldPos = -1;
  #heldFlags = 0;

  constructor(
    readonly mem: GuestMemory,
    readonly size: number,
    readonly ring: PackedRingAddrs,
  ) {}

  /** The DataView and offset of guest-physical [gpa, gpa+len) (one region). */
  at(gpa: number, len: number): [DataView, number] {
    const r = this.mem.regionOf(gpa, len);
    if (r < 0) throw new RangeError(`0x${gpa.toString(16)} is not in guest memory`);
    const region = this.mem.regions[r];
    return [region.view, gpa - region.gpa];
  }

  /** Ring descriptors the driver may still fill. */
  get free(): number {
    let used = 0;
    for (const n of this.sgs.values()) used += n;
    return this.size - used;
  }

  readDesc(pos: number): RawDesc {
    const [v, o] = this.at(this.ring.descGpa + pos * PACKED_DESC_SIZE, PACKED_DESC_SIZE);
    return {
      addr: Number(v.getBigUint64(o + PACKED_DESC_ADDR, true)),
      len: v.getUint32(o + PACKED_DESC_LEN, true),
      id: v.getUint16(o + PACKED_DESC_ID, true),
      flags: v.getUint16(o + PACKED_DESC_FLAGS, true),
    };
  }

  /** Writes a descriptor at `gpa` (ring slot or indirect entry); `flags` null: leave them. */
  writeDescAt(gpa: number, addr: number, len: number, id: number, flags: number | null): void {
    const [v, o] = this.at(gpa, PACKED_DESC_SIZE);
    v.setBigUint64(o + PACKED_DESC_ADDR, BigInt(addr), true);
    v.setUint32(o + PACKED_DESC_LEN, len, true);
    v.setUint16(o + PACKED_DESC_ID, id, true);
    if (flags !== null) v.setUint16(o + PACKED_DESC_FLAGS, flags, true);
  }

  /**
   * Makes buffer `id` available: one descriptor per element at the next positions (NEXT on all
   * but the last, the id in the last), the first one's flags written last, or only at
   * `release()` with `hold`. Returns the first position.
   */
  add(id: number, segs: readonly RawSeg[], opts: { hold?: boolean } = {}): number {
    const first = this.nextAvail;
    let firstFlags = 0;
    segs.forEach((s, i) => {
      const last = i === segs.length - 1;
      const flags = availFlags(this.availWrap) | (s.writable ? VIRTQ_DESC_F_WRITE : 0) |
        (last ? 0 : VIRTQ_DESC_F_NEXT) | (s.flags ?? 0);
      const gpa = this.ring.descGpa + this.nextAvail * PACKED_DESC_SIZE;
      // Ids in the other descriptors are not meaningful: write junk there.
      this.writeDescAt(gpa, s.gpa, s.len, last ? id : 0xbeef, i === 0 ? null : flags);
      if (i === 0) firstFlags = flags;
      if (++this.nextAvail === this.size) {
        this.nextAvail = 0;
        this.availWrap ^= 1;
      }
    });
    this.sgs.set(id, segs.length);
    if (opts.hold) {
      this.#heldPos = first;
      this.#heldFlags = firstFlags;
    } else {
      this.#setFlags(first, firstFlags);
    }
    return first;
  }

  /** Writes the first flags `add(..., { hold: true })` held back. */
  release(): void {
    this.#setFlags(this.#heldPos, this.#heldFlags);
    this.#heldPos = -1;
  }

  /**
   * Makes buffer `id` available as one INDIRECT descriptor whose table at `tableGpa` holds
   * `entries` (their `flags` ORed in; ids junk). `tableLen` overrides the table length.
   */
  addIndirect(
    id: number,
    tableGpa: number,
    entries: readonly RawSeg[],
    opts: { tableLen?: number; flags?: number } = {},
  ): number {
    entries.forEach((e, i) => {
      const flags = (e.writable ? VIRTQ_DESC_F_WRITE : 0) | (e.flags ?? 0);
      this.writeDescAt(tableGpa + i * PACKED_DESC_SIZE, e.gpa, e.len, 0x7777, flags);
    });
    const len = opts.tableLen ?? entries.length * PACKED_DESC_SIZE;
    return this.add(id, [{ gpa: tableGpa, len, flags: VIRTQ_DESC_F_INDIRECT | (opts.flags ?? 0) }]);
  }

  /** The next used buffer (skipping the positions it took), or null. */
  getUsed(): { id: number; len: number; flags: number } | null {
    const d = this.readDesc(this.nextUsed);
    if (!isUsed(d.flags, this.usedWrap)) return null;
    const n = this.sgs.get(d.id);
    if (n === undefined) throw new Error(`used id ${d.id} was not made available`);
    this.sgs.delete(d.id);
    this.nextUsed += n;
    if (this.nextUsed >= this.size) {
      this.nextUsed -= this.size;
      this.usedWrap ^= 1;
    }
    return { id: d.id, len: d.len, flags: d.flags };
  }

  /** Writes the driver event suppression structure (read by the device). */
  setDriverEvent(flags: number, offWrap = 0): void {
    const [v, o] = this.at(this.ring.driverEventGpa, 4);
    v.setUint16(o + PACKED_EVENT_OFF_WRAP, offWrap, true);
    v.setUint16(o + PACKED_EVENT_FLAGS, flags, true);
  }

  /** Reads the device event suppression structure (written by the device). */
  deviceEvent(): { offWrap: number; flags: number } {
    const [v, o] = this.at(this.ring.deviceEventGpa, 4);
    return {
      offWrap: v.getUint16(o + PACKED_EVENT_OFF_WRAP, true),
      flags: v.getUint16(o + PACKED_EVENT_FLAGS, true),
    };
  }

  #setFlags(pos: number, flags: number): void {
    const [v, o] = this.at(this.ring.descGpa + pos * PACKED_DESC_SIZE, PACKED_DESC_SIZE);
    v.setUint16(o + PACKED_DESC_FLAGS, flags, true);
  }
}
