/**
 * Driver side of a packed virtqueue (virtio 1.3, section 2.8 "Packed Virtqueues"), for tests,
 * the guest-driver emulator and the bench's guest.
 *
 * It plays the part of Linux's `virtio_ring.c` (packed layout) over any `GuestMemory`:
 *
 * - adding (`virtqueue_add_packed`): a buffer takes a free buffer id and the next ring slots
 *   (one per segment, chained with VIRTQ_DESC_F_NEXT, or one slot pointing at an indirect
 *   table); every descriptor carries the id; AVAIL/USED are set from the driver's wrap
 *   counter, which flips when the ring's last slot is filled. The flags of the first
 *   descriptor of a batch are withheld until `publish()`, so the device never sees part of
 *   a batch (the rest are written at once: the device reads in ring order and stops at the
 *   first descriptor that is not available);
 * - kicking (`virtqueue_kick_prepare_packed`): device event suppression DISABLE / ENABLE, or
 *   DESC with the packed event-index test over the descriptors published since the last
 *   decision;
 * - reaping (`virtqueue_get_buf_ctx_packed`): the descriptor at the next used slot is used when
 *   its AVAIL and USED bits both equal the driver's used wrap counter; its id says how many
 *   slots the buffer took (recorded per id at add time), and the driver skips that many;
 * - used buffer notifications (`virtqueue_enable_cb_prepare_packed` / `_disable_cb_packed`):
 *   driver event suppression DISABLE, ENABLE, or with EVENT_IDX DESC at the next used
 *   off_wrap (kept current while reaping with callbacks on), then a re-check.
 *
 * One buffer takes one id (Linux's packed ring takes one per descriptor, for DMA unmapping;
 * the device cannot tell). Ids come from a LIFO free list, like Linux's. A used descriptor
 * without VIRTQ_DESC_F_WRITE reports length 0: the spec makes its `len` reserved.
 *
 * Hot paths (`addBuffer`, `publish`, `kickNeeded`, `drainUsed`) allocate nothing. For fault
 * injection it also writes raw descriptors (any flags, id, AVAIL/USED bits) and raw event
 * suppression words.
 */

import type { GuestMemory } from "../virtio/memory.ts";
import {
  availFlags,
  isUsed,
  isValidPackedQueueSize,
  offWrap,
  PACKED_DESC_ADDR,
  PACKED_DESC_FLAGS,
  PACKED_DESC_ID,
  PACKED_DESC_LEN,
  PACKED_DESC_SIZE,
  PACKED_EVENT_FLAGS,
  PACKED_EVENT_OFF_WRAP,
  PACKED_EVENT_SIZE,
  PACKED_OFFSET_MASK,
  PACKED_WRAP_BIT,
  packedDescRingSize,
  packedNeedEvent,
  packedRingBase,
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_USED,
  VIRTQ_DESC_F_WRITE,
  writePackedAddrLen,
  writePackedDescriptor,
} from "../virtio/packed_layout.ts";
import type { DriverQueue, DriverSegment, UsedElem } from "./driver_queue.ts";

/** The vring base (SET_VRING_BASE) of a fresh packed ring: both indices 0, both wrap counters 1. */
export const PACKED_RING_START_BASE: number = packedRingBase({
  availIdx: 0,
  availWrap: 1,
  usedIdx: 0,
  usedWrap: 1,
});

export interface DriverPackedQueueOptions {
  /** VIRTIO_RING_F_EVENT_IDX negotiated (default false) */
  readonly eventIdx?: boolean;
}

/** One descriptor of `addRawBuffer`. */
export interface PackedRawDesc {
  /** guest-physical address; a bigint may exceed 2^53 */
  readonly addr: number | bigint;
  readonly len: number;
  /** VIRTQ_DESC_F_NEXT / _WRITE / _INDIRECT bits, verbatim (set NEXT yourself) */
  readonly flags: number;
  /** buffer id to write instead of the one reserved */
  readonly id?: number;
  /** AVAIL/USED bits to write instead of those of the driver's wrap counter */
  readonly availBits?: number;
}

/** Sentinel for "no free buffer id". */
const NO_ID = 0xffff;
/** u16 words per descriptor, and the words of its id and flags. */
const DESC_WORDS = PACKED_DESC_SIZE / 2;
const ID_WORD = PACKED_DESC_ID / 2;
const FLAGS_WORD = PACKED_DESC_FLAGS / 2;
const AVAIL_USED = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED;

/**
 * The driver side of one packed ring at the given guest-physical addresses (zeroed here, as
 * the spec wants a fresh ring). See the module doc.
 */
export class DriverPackedQueue implements DriverQueue {
  readonly packed = true as const;
  readonly size: number;
  readonly mem: GuestMemory;
  readonly descGpa: number;
  /** driver event suppression (vhost-user's "avail" address) */
  readonly driverEventGpa: number;
  /** device event suppression (vhost-user's "used" address) */
  readonly deviceEventGpa: number;
  readonly eventIdx: boolean;
  /** Used descriptors whose id was not an outstanding buffer (a device bug; skipped as 1 slot). */
  unexpectedUsed = 0;

  /** the descriptor ring */
  readonly #view: DataView;
  /** the descriptor ring as u16 words (ids and flags) */
  readonly #words: Uint16Array;
  /** driver event suppression: [off_wrap, flags] */
  readonly #driverEvent: Uint16Array;
  /**
   * device event suppression as one word, read as a snapshot: off_wrap in the low half, flags
   * in the high half (little endian, like the Uint16Array views)
   */
  readonly #deviceEvent: Uint32Array;
  /** per id: next free id */
  readonly #idNext: Uint16Array;
  /** per id: ring slots its buffer took (0 = not outstanding) */
  readonly #idDescs: Uint16Array;
  #freeId = 0;
  #numFree: number;
  #nextAvail = 0;
  #availWrap = 1;
  #nextUsed = 0;
  #usedWrap = 1;
  /** slot whose flags `publish` writes (the first of the unpublished batch), -1 if none */
  #batchSlot = -1;
  #batchFlags = 0;
  /** descriptors added since the last publish */
  #pending = 0;
  /** descriptors published since the last kick decision */
  #published = 0;
  /** next avail slot and wrap counter at the last publish */
  #pubIdx = 0;
  #pubWrap = 1;
  /** driver event suppression flags as last written */
  #eventFlags: number = RING_EVENT_FLAGS_ENABLE;
  /** used length of the buffer `#pop` returned last */
  #poppedLen = 0;

  constructor(
    mem: GuestMemory,
    size: number,
    descGpa: number,
    driverEventGpa: number,
    deviceEventGpa: number,
    options: DriverPackedQueueOptions = {},
  ) {
    if (!isValidPackedQueueSize(size)) throw new RangeError(`invalid packed queue size ${size}`);
    this.size = size;
    this.mem = mem;
    this.descGpa = descGpa;
    this.driverEventGpa = driverEventGpa;
    this.deviceEventGpa = deviceEventGpa;
    this.eventIdx = options.eventIdx ?? false;
    const ringBytes = packedDescRingSize(size);
    const desc = zeroedBytes(mem, "descriptor ring", descGpa, ringBytes);
    this.#view = new DataView(desc.buffer, desc.byteOffset, ringBytes);
    this.#words = new Uint16Array(desc.buffer, desc.byteOffset, ringBytes / 2);
    const drv = zeroedBytes(mem, "driver event suppression", driverEventGpa, PACKED_EVENT_SIZE);
    this.#driverEvent = new Uint16Array(drv.buffer, drv.byteOffset, 2);
    const dev = zeroedBytes(mem, "device event suppression", deviceEventGpa, PACKED_EVENT_SIZE);
    this.#deviceEvent = new Uint32Array(dev.buffer, dev.byteOffset, 1);
    this.#idNext = new Uint16Array(size);
    for (let i = 0; i < size; i++) this.#idNext[i] = i + 1 < size ? i + 1 : NO_ID;
    this.#idDescs = new Uint16Array(size);
    this.#numFree = size;
  }

  /** Free ring slots. */
  get numFree(): number {
    return this.#numFree;
  }

  /** Next avail slot and the driver's wrap counter, as an off_wrap word (unpublished included). */
  get availIdx(): number {
    return offWrap(this.#nextAvail, this.#availWrap);
  }

  /** Next used slot the driver will read and its used wrap counter, as an off_wrap word. */
  get lastUsed(): number {
    return offWrap(this.#nextUsed, this.#usedWrap);
  }

  /** Ring slots the buffer with `id` took (0 = not outstanding). */
  descCount(id: number): number {
    return id >= 0 && id < this.size ? this.#idDescs[id] : 0;
  }

  /**
   * Adds a buffer of `segments` (in the given order; a well-behaved driver puts readable ones
   * first), unpublished. With `indirectGpa` the segments go into an indirect table written
   * there (flags: VIRTQ_DESC_F_WRITE only) and the buffer takes one slot. Returns the buffer
   * id, or -1 if too few slots are free.
   */
  addBuffer(segments: readonly DriverSegment[], indirectGpa?: number): number {
    const n = segments.length;
    if (n === 0) throw new RangeError("a buffer needs at least one segment");
    const needed = indirectGpa === undefined ? n : 1;
    if (needed > this.#numFree || this.#freeId === NO_ID) return -1;
    if (indirectGpa === undefined) {
      const id = this.#takeId(needed);
      for (let i = 0; i < n; i++) {
        const s = segments[i];
        const f = (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0) | (s.writable ? VIRTQ_DESC_F_WRITE : 0);
        this.#put(s.gpa, s.len, id, f | availFlags(this.#availWrap));
      }
      return id;
    }
    const bytes = n * PACKED_DESC_SIZE;
    const r = this.mem.regionOf(indirectGpa, bytes);
    if (r < 0) throw new RangeError(`indirect table [0x${indirectGpa.toString(16)}, +${bytes})`);
    const region = this.mem.regions[r];
    for (let i = 0, o = indirectGpa - region.gpa; i < n; i++, o += PACKED_DESC_SIZE) {
      const s = segments[i];
      setDesc(region.view, o, s.gpa, s.len, 0, s.writable ? VIRTQ_DESC_F_WRITE : 0);
    }
    const id = this.#takeId(1);
    this.#put(indirectGpa, bytes, id, VIRTQ_DESC_F_INDIRECT | availFlags(this.#availWrap));
    return id;
  }

  /** Makes the added buffers available: writes the withheld flags of the batch's first slot. */
  publish(): void {
    if (this.#batchSlot >= 0) {
      Atomics.store(this.#words, this.#batchSlot * DESC_WORDS + FLAGS_WORD, this.#batchFlags);
      this.#batchSlot = -1;
    }
    this.#published += this.#pending;
    this.#pending = 0;
    this.#pubIdx = this.#nextAvail;
    this.#pubWrap = this.#availWrap;
  }

  /**
   * Whether the device wants a kick for the descriptors published since the last decision
   * (like `virtqueue_kick_prepare_packed`): device event flags DESC -> the packed event-index
   * test; otherwise anything but DISABLE.
   */
  kickNeeded(): boolean {
    const added = this.#published;
    this.#published = 0;
    // One load: off_wrap and flags from the same moment (Linux reads them as one u32).
    const ev = Atomics.load(this.#deviceEvent, 0);
    const flags = ev >>> 16;
    if (flags !== RING_EVENT_FLAGS_DESC) return flags !== RING_EVENT_FLAGS_DISABLE;
    if (added > this.size) return true; // more than a lap since the last decision: unknowable
    const newIdx = this.#pubIdx;
    return packedNeedEvent(ev & 0xffff, newIdx, newIdx - added, this.#pubWrap, this.size);
  }

  /** Reaps one used buffer, freeing its id and slots; null if none is pending. */
  popUsed(): UsedElem | null {
    const id = this.#pop();
    return id < 0 ? null : { head: id, len: this.#poppedLen };
  }

  /**
   * Reaps the used buffers like Linux's virtqueue callbacks: callbacks off, every used buffer
   * into `each(id, len)`, callbacks on with a re-check (buffers used meanwhile raised no
   * notification: reap them too). Returns how many were reaped.
   */
  drainUsed(each: (head: number, len: number) => void): number {
    let n = 0;
    for (;;) {
      this.disableCallbacks();
      for (let id = this.#pop(); id >= 0; id = this.#pop()) {
        n++;
        each(id, this.#poppedLen);
      }
      if (!this.enableCallbacks()) return n;
    }
  }

  /**
   * Arms used buffer notifications: with EVENT_IDX the driver event off_wrap = next used
   * slot and flags DESC, else flags ENABLE. Returns true if a used buffer is already pending
   * (it raised no notification: reap it now).
   */
  enableCallbacks(): boolean {
    if (this.eventIdx) {
      Atomics.store(this.#driverEvent, 0, offWrap(this.#nextUsed, this.#usedWrap));
      this.#setEventFlags(RING_EVENT_FLAGS_DESC);
    } else {
      this.#setEventFlags(RING_EVENT_FLAGS_ENABLE);
    }
    return this.#usedAt(this.#nextUsed, this.#usedWrap);
  }

  /** Suppresses used buffer notifications: driver event flags DISABLE. */
  disableCallbacks(): void {
    this.#setEventFlags(RING_EVENT_FLAGS_DISABLE);
  }

  /**
   * The device's next used slot and wrap counter (off_wrap), found by walking the used
   * descriptors from `lastUsed` (skipping by each buffer's slot count).
   */
  readUsedIdx(): number {
    let slot = this.#nextUsed;
    let wrap = this.#usedWrap;
    const outstanding = this.size - this.#numFree;
    for (let seen = 0; seen < outstanding && this.#usedAt(slot, wrap);) {
      const skip = this.#skipOf(this.#words[slot * DESC_WORDS + ID_WORD]);
      seen += skip;
      slot += skip;
      if (slot >= this.size) {
        slot -= this.size;
        wrap ^= 1;
      }
    }
    return offWrap(slot, wrap);
  }

  /** The device's used position as both halves of the base (`packedRingBase`). */
  recoveredBase(): number {
    const u = this.readUsedIdx();
    const idx = u & PACKED_OFFSET_MASK;
    const wrap = (u & PACKED_WRAP_BIT) !== 0 ? 1 : 0;
    return packedRingBase({ availIdx: idx, availWrap: wrap, usedIdx: idx, usedWrap: wrap });
  }

  // ---- raw access (fault injection and assertions) ----

  /**
   * Reserves an id and `descs.length` slots like `addBuffer`, then writes `descs` verbatim
   * (flags plus the AVAIL/USED bits of the driver's wrap counter unless `availBits`; the
   * reserved id unless `id`). Unpublished. Returns the reserved id, or -1 if too few slots.
   */
  addRawBuffer(descs: readonly PackedRawDesc[]): number {
    const n = descs.length;
    if (n === 0) throw new RangeError("a raw buffer needs at least one descriptor");
    if (n > this.#numFree || this.#freeId === NO_ID) return -1;
    const id = this.#takeId(n);
    for (const d of descs) {
      const bits = d.availBits ?? availFlags(this.#availWrap);
      const slot = this.#nextAvail;
      const f = (d.flags & ~AVAIL_USED) | (bits & AVAIL_USED);
      writePackedAddrLen(this.#view, slot * PACKED_DESC_SIZE, d.addr, d.len);
      this.#put(null, 0, d.id ?? id, f);
    }
    return id;
  }

  /** Writes ring slot `slot` verbatim (addr may be a bigint >= 2^53); flags last. */
  writeRawDesc(slot: number, addr: number | bigint, len: number, id: number, flags: number): void {
    if (!(slot >= 0 && slot < this.size)) throw new RangeError(`slot ${slot} out of range`);
    writePackedDescriptor(this.#view, slot * PACKED_DESC_SIZE, addr, len, id, flags);
  }

  /** Writes a packed descriptor at any guest address (e.g. an indirect table entry). */
  writeRawDescAt(gpa: number, addr: number | bigint, len: number, id: number, flags: number): void {
    const r = this.mem.regionOf(gpa, PACKED_DESC_SIZE);
    if (r < 0) throw new RangeError(`descriptor at 0x${gpa.toString(16)} is not in memory`);
    const region = this.mem.regions[r];
    writePackedDescriptor(region.view, gpa - region.gpa, addr, len, id, flags);
  }

  /** Writes the driver event suppression structure verbatim. */
  setDriverEventRaw(offWrapWord: number, flags: number): void {
    Atomics.store(this.#driverEvent, PACKED_EVENT_OFF_WRAP / 2, offWrapWord & 0xffff);
    this.#eventFlags = flags & 0xffff;
    Atomics.store(this.#driverEvent, PACKED_EVENT_FLAGS / 2, this.#eventFlags);
  }

  /** Driver event suppression off_wrap as last written. */
  readDriverEventOffWrap(): number {
    return Atomics.load(this.#driverEvent, PACKED_EVENT_OFF_WRAP / 2);
  }

  /** Driver event suppression flags as last written. */
  readDriverEventFlags(): number {
    return Atomics.load(this.#driverEvent, PACKED_EVENT_FLAGS / 2);
  }

  /** Device event suppression off_wrap as the device last wrote it. */
  readDeviceEventOffWrap(): number {
    return Atomics.load(this.#deviceEvent, 0) & 0xffff;
  }

  /** Device event suppression flags as the device last wrote it. */
  readDeviceEventFlags(): number {
    return Atomics.load(this.#deviceEvent, 0) >>> 16;
  }

  /** Flags of ring slot `slot`. */
  readDescFlags(slot: number): number {
    return Atomics.load(this.#words, slot * DESC_WORDS + FLAGS_WORD);
  }

  /** Buffer id in ring slot `slot`. */
  readDescId(slot: number): number {
    return this.#words[slot * DESC_WORDS + ID_WORD];
  }

  // ---- internals ----

  #takeId(slots: number): number {
    const id = this.#freeId;
    this.#freeId = this.#idNext[id];
    this.#idDescs[id] = slots;
    this.#numFree -= slots;
    return id;
  }

  /**
   * Fills the next avail slot (addr/len unless `addr` is null: already written) with `id` and
   * `flags`, withholding the flags of a batch's first slot, and moves on.
   */
  #put(addr: number | null, len: number, id: number, flags: number): void {
    const slot = this.#nextAvail;
    if (addr !== null) setDesc(this.#view, slot * PACKED_DESC_SIZE, addr, len, id, -1);
    else this.#words[slot * DESC_WORDS + ID_WORD] = id & 0xffff;
    if (this.#batchSlot < 0) {
      this.#batchSlot = slot;
      this.#batchFlags = flags & 0xffff;
    } else {
      Atomics.store(this.#words, slot * DESC_WORDS + FLAGS_WORD, flags);
    }
    this.#pending++;
    if (++this.#nextAvail === this.size) {
      this.#nextAvail = 0;
      this.#availWrap ^= 1;
    }
  }

  /** Reaps the next used buffer: its id (its length in #poppedLen), or -1 if none. */
  #pop(): number {
    const slot = this.#nextUsed;
    const flags = Atomics.load(this.#words, slot * DESC_WORDS + FLAGS_WORD);
    if (!isUsed(flags, this.#usedWrap)) return -1;
    const id = this.#words[slot * DESC_WORDS + ID_WORD];
    this.#poppedLen = (flags & VIRTQ_DESC_F_WRITE) !== 0
      ? this.#view.getUint32(slot * PACKED_DESC_SIZE + PACKED_DESC_LEN, true)
      : 0;
    const skip = this.#skipOf(id);
    if (id < this.size && this.#idDescs[id] !== 0) {
      this.#idDescs[id] = 0;
      this.#idNext[id] = this.#freeId;
      this.#freeId = id;
      this.#numFree += skip;
    } else {
      this.unexpectedUsed++;
    }
    this.#nextUsed += skip;
    if (this.#nextUsed >= this.size) {
      this.#nextUsed -= this.size;
      this.#usedWrap ^= 1;
    }
    if (this.#eventFlags === RING_EVENT_FLAGS_DESC) {
      // virtqueue_get_buf_ctx_packed: the next notification at the next used slot
      Atomics.store(this.#driverEvent, 0, offWrap(this.#nextUsed, this.#usedWrap));
    }
    return id;
  }

  /** Slots to skip for a used descriptor with `id` (1 for an id that is not outstanding). */
  #skipOf(id: number): number {
    return id < this.size && this.#idDescs[id] !== 0 ? this.#idDescs[id] : 1;
  }

  #usedAt(slot: number, wrap: number): boolean {
    return isUsed(Atomics.load(this.#words, slot * DESC_WORDS + FLAGS_WORD), wrap);
  }

  #setEventFlags(flags: number): void {
    if (this.#eventFlags === flags) return;
    this.#eventFlags = flags;
    Atomics.store(this.#driverEvent, PACKED_EVENT_FLAGS / 2, flags);
  }
}

/**
 * Writes addr (a safe integer), len and id of a descriptor at `off`, and its flags unless
 * `flags` is negative. No BigInt: the per-packet path.
 */
function setDesc(
  view: DataView,
  off: number,
  addr: number,
  len: number,
  id: number,
  flags: number,
): void {
  view.setUint32(off + PACKED_DESC_ADDR, addr >>> 0, true);
  view.setUint32(off + PACKED_DESC_ADDR + 4, Math.floor(addr / 0x1_0000_0000), true);
  view.setUint32(off + PACKED_DESC_LEN, len >>> 0, true);
  view.setUint16(off + PACKED_DESC_ID, id, true);
  if (flags >= 0) view.setUint16(off + PACKED_DESC_FLAGS, flags, true);
}

/** The bytes of guest-physical [gpa, gpa+len), zeroed; throws if no region holds them. */
function zeroedBytes(mem: GuestMemory, what: string, gpa: number, len: number): Uint8Array {
  const r = mem.regionOf(gpa, len);
  if (r < 0) throw new RangeError(`${what} [0x${gpa.toString(16)}, +${len}) is not in memory`);
  const region = mem.regions[r];
  const bytes = region.bytes.subarray(gpa - region.gpa, gpa - region.gpa + len);
  bytes.fill(0);
  return bytes;
}
