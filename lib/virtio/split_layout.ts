/**
 * Memory layout of a split virtqueue (virtio 1.3, section 2.7 "Split Virtqueues").
 *
 * A split virtqueue of `num` entries (a power of 2, at most 32768) has three parts
 * in guest memory, each at its own guest-physical address, all little endian:
 *
 * ```
 * descriptor table  (align 16)   num x { le64 addr; le32 len; le16 flags; le16 next; }
 * available ring    (align 2)    le16 flags; le16 idx; le16 ring[num]; le16 used_event;
 * used ring         (align 4)    le16 flags; le16 idx; { le32 id; le32 len; } ring[num];
 *                                le16 avail_event;
 * ```
 *
 * `used_event` and `avail_event` exist only when VIRTIO_RING_F_EVENT_IDX is
 * negotiated. The driver owns the descriptor table and the available ring; the
 * device owns the used ring. `idx` fields are free-running u16 counters; ring
 * slots are `idx % num`.
 */

/** Largest queue size the split layout allows. */
export const VIRTQ_MAX_SIZE = 32768;

/** Descriptor continues via the `next` field. */
export const VRING_DESC_F_NEXT = 1;
/** Buffer is device write-only (otherwise device read-only). */
export const VRING_DESC_F_WRITE = 2;
/** Buffer contains a table of descriptors (VIRTIO_RING_F_INDIRECT_DESC). */
export const VRING_DESC_F_INDIRECT = 4;

/** In avail.flags: the driver asks the device not to send used buffer notifications. */
export const VRING_AVAIL_F_NO_INTERRUPT = 1;
/** In used.flags: the device asks the driver not to send available buffer notifications. */
export const VRING_USED_F_NO_NOTIFY = 1;

/** Required alignment of each part. */
export const VRING_DESC_ALIGN = 16;
export const VRING_AVAIL_ALIGN = 2;
export const VRING_USED_ALIGN = 4;

/** One descriptor: addr u64 @0, len u32 @8, flags u16 @12, next u16 @14. */
export const VRING_DESC_SIZE = 16;
export const VRING_DESC_ADDR = 0;
export const VRING_DESC_LEN = 8;
export const VRING_DESC_FLAGS = 12;
export const VRING_DESC_NEXT = 14;

/** Available ring header: flags u16 @0, idx u16 @2, ring[] from @4. */
export const VRING_AVAIL_FLAGS = 0;
export const VRING_AVAIL_IDX = 2;
export const VRING_AVAIL_RING = 4;
export const VRING_AVAIL_ELEM_SIZE = 2;

/** Used ring header: flags u16 @0, idx u16 @2, ring[] from @4; element id u32 @0, len u32 @4. */
export const VRING_USED_FLAGS = 0;
export const VRING_USED_IDX = 2;
export const VRING_USED_RING = 4;
export const VRING_USED_ELEM_SIZE = 8;
export const VRING_USED_ELEM_ID = 0;
export const VRING_USED_ELEM_LEN = 4;

/**
 * Writes one descriptor at byte `off` of `view` (little endian); `addr` may be a bigint
 * >= 2^53 and is truncated to 64 bits, `len` to 32, `flags` and `next` to 16.
 */
export function writeDescriptor(
  view: DataView,
  off: number,
  addr: number | bigint,
  len: number,
  flags: number,
  next: number,
): void {
  const a = BigInt.asUintN(64, BigInt(addr));
  view.setUint32(off + VRING_DESC_ADDR, Number(a & 0xffff_ffffn), true);
  view.setUint32(off + VRING_DESC_ADDR + 4, Number(a >> 32n), true);
  view.setUint32(off + VRING_DESC_LEN, len >>> 0, true);
  view.setUint16(off + VRING_DESC_FLAGS, flags & 0xffff, true);
  view.setUint16(off + VRING_DESC_NEXT, next & 0xffff, true);
}

/** True if `num` is a valid split queue size: a power of 2 in 1..32768. */
export function isValidQueueSize(num: number): boolean {
  return Number.isInteger(num) && num >= 1 && num <= VIRTQ_MAX_SIZE && (num & (num - 1)) === 0;
}

/** Bytes of the descriptor table. */
export function descTableSize(num: number): number {
  return VRING_DESC_SIZE * num;
}

/** Bytes of the available ring (with `used_event` when `eventIdx`). */
export function availRingSize(num: number, eventIdx: boolean): number {
  return VRING_AVAIL_RING + VRING_AVAIL_ELEM_SIZE * num + (eventIdx ? 2 : 0);
}

/** Bytes of the used ring (with `avail_event` when `eventIdx`). */
export function usedRingSize(num: number, eventIdx: boolean): number {
  return VRING_USED_RING + VRING_USED_ELEM_SIZE * num + (eventIdx ? 2 : 0);
}

/** Offset of avail.ring[slot] from the start of the available ring. */
export function availElemOffset(slot: number): number {
  return VRING_AVAIL_RING + VRING_AVAIL_ELEM_SIZE * slot;
}

/** Offset of `used_event` (after avail.ring[num]) from the start of the available ring. */
export function usedEventOffset(num: number): number {
  return VRING_AVAIL_RING + VRING_AVAIL_ELEM_SIZE * num;
}

/** Offset of used.ring[slot] from the start of the used ring. */
export function usedElemOffset(slot: number): number {
  return VRING_USED_RING + VRING_USED_ELEM_SIZE * slot;
}

/** Offset of `avail_event` (after used.ring[num]) from the start of the used ring. */
export function availEventOffset(num: number): number {
  return VRING_USED_RING + VRING_USED_ELEM_SIZE * num;
}

/**
 * The event-index test of the spec (`vring_need_event`): with the other side's
 * event index `eventIdx`, moving our idx from `oldIdx` to `newIdx` requires a
 * notification iff `eventIdx` lies in [oldIdx, newIdx) (u16 arithmetic).
 */
export function vringNeedEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

/** Guest-physical addresses of the three parts of a split ring. */
export interface SplitRingAddrs {
  readonly descGpa: number;
  readonly availGpa: number;
  readonly usedGpa: number;
  /** first byte after the used ring */
  readonly end: number;
}

/**
 * A compact layout for a ring of `num` entries starting at `baseGpa` (which must
 * be 16-aligned): descriptor table, then the available ring, then the used ring
 * at the next 4-byte boundary. (Legacy virtio placed the used ring on the next
 * page; modern drivers may place the parts anywhere.)
 */
export function compactRingLayout(num: number, baseGpa: number, eventIdx = true): SplitRingAddrs {
  if (!isValidQueueSize(num)) throw new RangeError(`invalid queue size ${num}`);
  if (baseGpa % VRING_DESC_ALIGN !== 0) throw new RangeError(`base ${baseGpa} is not 16-aligned`);
  const descGpa = baseGpa;
  const availGpa = descGpa + descTableSize(num);
  const availEnd = availGpa + availRingSize(num, eventIdx);
  const usedGpa = Math.ceil(availEnd / VRING_USED_ALIGN) * VRING_USED_ALIGN;
  return { descGpa, availGpa, usedGpa, end: usedGpa + usedRingSize(num, eventIdx) };
}
