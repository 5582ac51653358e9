/**
 * Memory layout of a packed virtqueue (virtio 1.3, section 2.8 "Packed Virtqueues").
 *
 * A packed virtqueue of `num` entries (1..32768, not necessarily a power of 2) has
 * three parts in guest memory, all little endian:
 *
 * ```
 * descriptor ring            (align 16)  num x { le64 addr; le32 len; le16 id; le16 flags; }
 * driver event suppression   (align 4)   le16 desc (off:15, wrap:1); le16 flags;  read by the device
 * device event suppression   (align 4)   le16 desc (off:15, wrap:1); le16 flags;  written by the device
 * ```
 *
 * In vhost-user's VHOST_USER_SET_VRING_ADDR the three addresses arrive as
 * "descriptor", "available" (= driver area) and "used" (= device area).
 *
 * Both sides keep a ring wrap counter that starts at 1 and flips each time they
 * pass the end of the ring. The driver makes a descriptor available by writing
 * its flags with VIRTQ_DESC_F_AVAIL = its wrap counter and VIRTQ_DESC_F_USED = the
 * inverse; the device marks a buffer used by writing one descriptor (buffer id,
 * bytes written) whose AVAIL and USED bits both equal the device's wrap counter,
 * at its next used position, then skips forward by the number of ring
 * descriptors the buffer occupied. A chain is consecutive descriptors linked by
 * VIRTQ_DESC_F_NEXT; its buffer id is in the last one. An indirect table holds
 * packed descriptors whose only meaningful flag is VIRTQ_DESC_F_WRITE.
 *
 * vhost-user carries a packed ring's position in the 32-bit `num` of
 * SET_VRING_BASE / GET_VRING_BASE: bits 0-14 next avail index, bit 15 avail wrap
 * counter, bits 16-30 next used index, bit 31 used wrap counter
 * (`packedRingBase` / `parsePackedRingBase`).
 */

/** Largest queue size the packed layout allows (2^15). */
export const PACKED_VIRTQ_MAX_SIZE = 32768;

/** Descriptor continues in the next ring slot (same value as the split ring's). */
export const VIRTQ_DESC_F_NEXT = 1;
/** Element is device write-only; in a used descriptor: the device wrote data. */
export const VIRTQ_DESC_F_WRITE = 2;
/** Element is a table of packed descriptors (VIRTIO_F_INDIRECT_DESC). */
export const VIRTQ_DESC_F_INDIRECT = 4;
/** Available bit: equals the driver's wrap counter when the descriptor is made available. */
export const VIRTQ_DESC_F_AVAIL = 1 << 7;
/** Used bit: equals the device's wrap counter (as does AVAIL) when the buffer is used. */
export const VIRTQ_DESC_F_USED = 1 << 15;

/** Event suppression flags: notify on every event. */
export const RING_EVENT_FLAGS_ENABLE = 0x0;
/** Event suppression flags: no notifications. */
export const RING_EVENT_FLAGS_DISABLE = 0x1;
/** Event suppression flags: notify when the descriptor at `desc` (offset + wrap) is reached (EVENT_IDX). */
export const RING_EVENT_FLAGS_DESC = 0x2;

/** Required alignment of each part. */
export const PACKED_DESC_ALIGN = 16;
export const PACKED_EVENT_ALIGN = 4;

/** One descriptor: addr u64 @0, len u32 @8, id u16 @12, flags u16 @14. */
export const PACKED_DESC_SIZE = 16;
export const PACKED_DESC_ADDR = 0;
export const PACKED_DESC_LEN = 8;
export const PACKED_DESC_ID = 12;
export const PACKED_DESC_FLAGS = 14;

/** Event suppression structure: desc (off_wrap) u16 @0, flags u16 @2; 4 bytes. */
export const PACKED_EVENT_OFF_WRAP = 0;
export const PACKED_EVENT_FLAGS = 2;
export const PACKED_EVENT_SIZE = 4;

/** Bit 15 of an off_wrap word (and of a vring base half): the wrap counter. */
export const PACKED_WRAP_BIT = 0x8000;
/** Bits 0-14 of an off_wrap word: the ring offset. */
export const PACKED_OFFSET_MASK = 0x7fff;

/**
 * Writes one packed descriptor at byte `off` of `view` (little endian); `addr` may be a bigint
 * >= 2^53 and is truncated to 64 bits, `len` to 32, `id` and `flags` to 16. Flags go last.
 */
export function writePackedDescriptor(
  view: DataView,
  off: number,
  addr: number | bigint,
  len: number,
  id: number,
  flags: number,
): void {
  writePackedAddrLen(view, off, addr, len);
  view.setUint16(off + PACKED_DESC_ID, id & 0xffff, true);
  view.setUint16(off + PACKED_DESC_FLAGS, flags & 0xffff, true);
}

/** Writes a packed descriptor's addr (truncated to 64 bits) and len (to 32). */
export function writePackedAddrLen(
  view: DataView,
  off: number,
  addr: number | bigint,
  len: number,
): void {
  const a = BigInt.asUintN(64, BigInt(addr));
  view.setUint32(off + PACKED_DESC_ADDR, Number(a & 0xffff_ffffn), true);
  view.setUint32(off + PACKED_DESC_ADDR + 4, Number(a >> 32n), true);
  view.setUint32(off + PACKED_DESC_LEN, len >>> 0, true);
}

/** True if `num` is a valid packed queue size: 1..32768. */
export function isValidPackedQueueSize(num: number): boolean {
  return Number.isInteger(num) && num >= 1 && num <= PACKED_VIRTQ_MAX_SIZE;
}

/** Bytes of the descriptor ring. */
export function packedDescRingSize(num: number): number {
  return PACKED_DESC_SIZE * num;
}

/** True if a descriptor with `flags` is available to a device whose avail wrap counter is `wrap` (0/1). */
export function isAvailable(flags: number, wrap: number): boolean {
  const avail = (flags & VIRTQ_DESC_F_AVAIL) !== 0 ? 1 : 0;
  const used = (flags & VIRTQ_DESC_F_USED) !== 0 ? 1 : 0;
  return avail === wrap && used !== wrap;
}

/** True if a descriptor with `flags` is used for a driver whose used wrap counter is `wrap` (0/1). */
export function isUsed(flags: number, wrap: number): boolean {
  const avail = (flags & VIRTQ_DESC_F_AVAIL) !== 0 ? 1 : 0;
  const used = (flags & VIRTQ_DESC_F_USED) !== 0 ? 1 : 0;
  return avail === used && used === wrap;
}

/** The AVAIL/USED bits a driver with wrap counter `wrap` writes to make a descriptor available. */
export function availFlags(wrap: number): number {
  return wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED;
}

/** The AVAIL/USED bits a device with wrap counter `wrap` writes to mark a buffer used. */
export function usedFlags(wrap: number): number {
  return wrap ? VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED : 0;
}

/** An off_wrap word: ring offset in bits 0-14, wrap counter in bit 15. */
export function offWrap(offset: number, wrap: number): number {
  return (offset & PACKED_OFFSET_MASK) | (wrap ? PACKED_WRAP_BIT : 0);
}

/** A packed ring's position, as vhost-user's SET/GET_VRING_BASE carries it. */
export interface PackedRingBase {
  readonly availIdx: number;
  readonly availWrap: number;
  readonly usedIdx: number;
  readonly usedWrap: number;
}

/** Encodes a packed ring's position into vhost-user's 32-bit vring base `num`. */
export function packedRingBase(b: PackedRingBase): number {
  return (offWrap(b.availIdx, b.availWrap) | (offWrap(b.usedIdx, b.usedWrap) << 16)) >>> 0;
}

/** Decodes vhost-user's 32-bit vring base `num` for a packed ring. */
export function parsePackedRingBase(num: number): PackedRingBase {
  return {
    availIdx: num & PACKED_OFFSET_MASK,
    availWrap: (num & PACKED_WRAP_BIT) !== 0 ? 1 : 0,
    usedIdx: (num >>> 16) & PACKED_OFFSET_MASK,
    usedWrap: ((num >>> 16) & PACKED_WRAP_BIT) !== 0 ? 1 : 0,
  };
}

/**
 * The packed-ring event-index test (what Linux `vhost_vring_packed_need_event`
 * and `virtqueue_kick_prepare_packed` compute): the other side asked for an event
 * at `eventOffWrap`; we moved our position from `oldIdx` to `newIdx` (ring
 * offsets; `oldIdx` may be negative when the move crossed the end of the ring, the
 * move shorter than the ring) and are now at wrap counter `wrap`.
 * The event's offset is taken relative to our current lap: if its wrap bit
 * differs from `wrap` it refers to the previous lap (offset - num).
 */
export function packedNeedEvent(
  eventOffWrap: number,
  newIdx: number,
  oldIdx: number,
  wrap: number,
  num: number,
): boolean {
  let event = eventOffWrap & PACKED_OFFSET_MASK;
  const eventWrap = (eventOffWrap & PACKED_WRAP_BIT) !== 0 ? 1 : 0;
  if (eventWrap !== wrap) event -= num;
  // vring_need_event on u16 arithmetic, with the lap-adjusted event index
  return ((newIdx - event - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

/** Guest-physical addresses of the three parts of a packed ring. */
export interface PackedRingAddrs {
  readonly descGpa: number;
  /** driver event suppression (vhost-user's "avail" address) */
  readonly driverEventGpa: number;
  /** device event suppression (vhost-user's "used" address) */
  readonly deviceEventGpa: number;
  /** first byte after the ring */
  readonly end: number;
}

/** A compact layout for a packed ring of `num` entries at `baseGpa` (16-aligned). */
export function compactPackedRingLayout(num: number, baseGpa: number): PackedRingAddrs {
  if (!isValidPackedQueueSize(num)) throw new RangeError(`invalid packed queue size ${num}`);
  if (baseGpa % PACKED_DESC_ALIGN !== 0) throw new RangeError(`base ${baseGpa} is not 16-aligned`);
  const descGpa = baseGpa;
  const driverEventGpa = descGpa + packedDescRingSize(num);
  const deviceEventGpa = driverEventGpa + PACKED_EVENT_SIZE;
  return { descGpa, driverEventGpa, deviceEventGpa, end: deviceEventGpa + PACKED_EVENT_SIZE };
}
