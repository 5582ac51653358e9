/**
 * Driver side of a split virtqueue, for tests and the guest-driver emulator.
 *
 * It plays the part of Linux's `virtio_ring.c` (split layout) over any
 * `GuestMemory`: it owns the descriptor table and the available ring, keeps a
 * free list of descriptors, chains buffers with VRING_DESC_F_NEXT (or puts them
 * in an indirect table), publishes `avail.idx`, decides whether to kick like
 * `virtqueue_kick_prepare_split` (VRING_USED_F_NO_NOTIFY, or avail_event with
 * VIRTIO_RING_F_EVENT_IDX), reaps the used ring, and arms or suppresses used
 * buffer notifications (VRING_AVAIL_F_NO_INTERRUPT, or used_event).
 *
 * For fault injection it also writes arbitrary descriptors and avail entries
 * (loops, out-of-range addresses, nested indirect tables) that the free-list
 * logic would never produce.
 *
 * `DriverQueue` is what the testing guest's rings need of a driver queue, split
 * (this class) or packed (`DriverPackedQueue`, driver_packed_queue.ts).
 */

import type { GuestMemory, MemRegion } from "../virtio/memory.ts";
import {
  availElemOffset,
  availEventOffset,
  availRingSize,
  descTableSize,
  isValidQueueSize,
  usedElemOffset,
  usedEventOffset,
  usedRingSize,
  VRING_AVAIL_F_NO_INTERRUPT,
  VRING_AVAIL_FLAGS,
  VRING_AVAIL_IDX,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_DESC_SIZE,
  VRING_USED_ELEM_ID,
  VRING_USED_ELEM_LEN,
  VRING_USED_F_NO_NOTIFY,
  VRING_USED_FLAGS,
  VRING_USED_IDX,
  vringNeedEvent,
  writeDescriptor,
} from "../virtio/split_layout.ts";

/** One buffer of a chain: guest-physical range, device-writable or not. */
export interface DriverSegment {
  readonly gpa: number;
  readonly len: number;
  readonly writable: boolean;
}

/** A used element as the device returned it. */
export interface UsedElem {
  readonly head: number;
  readonly len: number;
}

export interface DriverQueueOptions {
  /** VIRTIO_RING_F_EVENT_IDX negotiated (default false) */
  readonly eventIdx?: boolean;
  /**
   * Initial avail.idx and used.idx (default 0), as if the ring had already
   * carried that many buffers: lets tests cross the u16 wrap quickly.
   */
  readonly startIdx?: number;
}

/**
 * The driver side of a virtqueue as the guest's rings use it (guest_rings.ts, the bench's
 * lean_rings.ts), split (`DriverSplitQueue`) or packed (`DriverPackedQueue`). Positions
 * (`availIdx`, `lastUsed`, `readUsedIdx`) are a split ring's free-running u16 indices, and a
 * packed ring's off_wrap words (ring offset in bits 0-14, wrap counter in bit 15); in both,
 * `readUsedIdx() === availIdx` once the device used everything published.
 */
export interface DriverQueue {
  /** VIRTIO_F_RING_PACKED layout */
  readonly packed: boolean;
  /** entries */
  readonly size: number;
  /** VIRTIO_RING_F_EVENT_IDX negotiated */
  readonly eventIdx: boolean;
  /** used elements whose id was not an outstanding buffer (a device bug) */
  readonly unexpectedUsed: number;
  /** free descriptors (split: table entries; packed: ring slots) */
  readonly numFree: number;
  /** next avail position, including buffers added but not yet published */
  readonly availIdx: number;
  /** next used position the driver will reap */
  readonly lastUsed: number;
  /**
   * Adds a buffer of `segments` (readable ones first), unpublished; with `indirectGpa` in an
   * indirect table written there. Returns its head (split) / buffer id (packed), or -1 when
   * too few descriptors are free.
   */
  addBuffer(segments: readonly DriverSegment[], indirectGpa?: number): number;
  /** Makes the buffers added so far visible to the device. */
  publish(): void;
  /** Whether the device wants a kick for what was published since the last decision. */
  kickNeeded(): boolean;
  /** Reaps one used buffer, freeing its descriptors; null if none is pending. */
  popUsed(): UsedElem | null;
  /**
   * Reaps the used buffers like Linux's virtqueue callbacks: callbacks off, every used
   * buffer into `each`, callbacks on with a re-check. Returns how many were reaped.
   */
  drainUsed(each: (head: number, len: number) => void): number;
  /** Arms used buffer notifications; true if used buffers are already pending. */
  enableCallbacks(): boolean;
  /** Suppresses used buffer notifications. */
  disableCallbacks(): void;
  /** The device's next used position as the ring shows it (see the interface doc). */
  readUsedIdx(): number;
  /**
   * The vring base a VMM recovers from the rings without GET_VRING_BASE (re-attaching after
   * a disconnect): the device resumes at its used position.
   */
  recoveredBase(): number;
}

/** Sentinel for "no next free descriptor". */
const NO_DESC = 0xffff;

export class DriverSplitQueue implements DriverQueue {
  readonly packed = false as const;
  readonly size: number;
  readonly mem: GuestMemory;
  readonly descGpa: number;
  readonly availGpa: number;
  readonly usedGpa: number;
  readonly eventIdx: boolean;
  /** Used elements whose id was not an outstanding head (a device bug). */
  unexpectedUsed = 0;

  readonly #desc: Part;
  readonly #avail: Part;
  readonly #used: Part;
  readonly #availIdxWord: Uint16Array;
  readonly #usedIdxWord: Uint16Array;
  readonly #usedEventWord: Uint16Array | null;
  readonly #availFlagsWord: Uint16Array;
  readonly #availEventWord: Uint16Array | null;
  readonly #usedFlagsWord: Uint16Array;
  /** per descriptor: next free descriptor (free list) or next in its chain */
  readonly #next: Uint16Array;
  /** per head: number of table descriptors its chain holds (0 = not outstanding) */
  readonly #chainDescs: Uint16Array;
  #freeHead = 0;
  #numFree: number;
  /** avail idx including unpublished entries */
  #availShadow: number;
  /** avail.idx as last published */
  #published: number;
  /** avail.idx at the previous kick decision */
  #kickedAt: number;
  #lastUsed: number;
  #availFlags = 0;
  #callbacksEnabled = true;

  constructor(
    mem: GuestMemory,
    size: number,
    descGpa: number,
    availGpa: number,
    usedGpa: number,
    options: DriverQueueOptions = {},
  ) {
    if (!isValidQueueSize(size)) throw new RangeError(`invalid queue size ${size}`);
    const eventIdx = options.eventIdx ?? false;
    const start = (options.startIdx ?? 0) & 0xffff;
    this.size = size;
    this.mem = mem;
    this.descGpa = descGpa;
    this.availGpa = availGpa;
    this.usedGpa = usedGpa;
    this.eventIdx = eventIdx;
    this.#desc = part(mem, "descriptor table", descGpa, descTableSize(size));
    this.#avail = part(mem, "available ring", availGpa, availRingSize(size, eventIdx));
    this.#used = part(mem, "used ring", usedGpa, usedRingSize(size, eventIdx));
    this.#desc.region.bytes.fill(0, this.#desc.off, this.#desc.off + descTableSize(size));
    this.#avail.region.bytes.fill(
      0,
      this.#avail.off,
      this.#avail.off + availRingSize(size, eventIdx),
    );
    this.#used.region.bytes.fill(0, this.#used.off, this.#used.off + usedRingSize(size, eventIdx));
    this.#availIdxWord = word16(this.#avail, VRING_AVAIL_IDX);
    this.#usedIdxWord = word16(this.#used, VRING_USED_IDX);
    this.#usedEventWord = eventIdx ? word16(this.#avail, usedEventOffset(size)) : null;
    this.#availFlagsWord = word16(this.#avail, VRING_AVAIL_FLAGS);
    this.#availEventWord = eventIdx ? word16(this.#used, availEventOffset(size)) : null;
    this.#usedFlagsWord = word16(this.#used, VRING_USED_FLAGS);
    Atomics.store(this.#availIdxWord, 0, start);
    Atomics.store(this.#usedIdxWord, 0, start);
    if (this.#usedEventWord !== null) Atomics.store(this.#usedEventWord, 0, start);
    this.#availShadow = start;
    this.#published = start;
    this.#kickedAt = start;
    this.#lastUsed = start;
    this.#next = new Uint16Array(size);
    for (let i = 0; i < size; i++) this.#next[i] = i + 1 < size ? i + 1 : NO_DESC;
    this.#chainDescs = new Uint16Array(size);
    this.#numFree = size;
  }

  /** Free descriptors in the table. */
  get numFree(): number {
    return this.#numFree;
  }

  /** avail idx including entries added but not yet published. */
  get availIdx(): number {
    return this.#availShadow;
  }

  /** Next used index the driver will reap. */
  get lastUsed(): number {
    return this.#lastUsed;
  }

  /**
   * Adds a chain of `segments` (in the given order; a well-behaved driver puts
   * readable ones first) to the avail ring, unpublished. With `indirectGpa` the
   * segments go into an indirect table written there and the chain uses one
   * descriptor. Returns the head, or -1 if too few descriptors are free.
   */
  addBuffer(segments: readonly DriverSegment[], indirectGpa?: number): number {
    const n = segments.length;
    if (n === 0) throw new RangeError("a chain needs at least one segment");
    const needed = indirectGpa === undefined ? n : 1;
    if (needed > this.#numFree) return -1;
    const head = this.#freeHead;
    if (indirectGpa !== undefined) {
      for (let i = 0; i < n; i++) {
        const s = segments[i];
        const flags = (i + 1 < n ? VRING_DESC_F_NEXT : 0) | (s.writable ? VRING_DESC_F_WRITE : 0);
        this.writeDescAt(
          indirectGpa + i * VRING_DESC_SIZE,
          s.gpa,
          s.len,
          flags,
          i + 1 < n ? i + 1 : 0,
        );
      }
      this.#freeHead = this.#next[head];
      this.writeDesc(head, indirectGpa, n * VRING_DESC_SIZE, VRING_DESC_F_INDIRECT, 0);
    } else {
      let d = head;
      for (let i = 0; i < n; i++) {
        const s = segments[i];
        const nextFree = this.#next[d];
        const last = i + 1 === n;
        const flags = (last ? 0 : VRING_DESC_F_NEXT) | (s.writable ? VRING_DESC_F_WRITE : 0);
        this.writeDesc(d, s.gpa, s.len, flags, last ? 0 : nextFree);
        if (last) this.#freeHead = nextFree;
        d = nextFree;
      }
    }
    this.#numFree -= needed;
    this.#chainDescs[head] = needed;
    this.pushAvailRaw(head);
    return head;
  }

  /** Makes added buffers visible to the device: writes avail.idx. */
  publish(): void {
    Atomics.store(this.#availIdxWord, 0, this.#availShadow);
    this.#published = this.#availShadow;
  }

  /**
   * Whether the device wants a kick for the buffers published since the last
   * decision (like `virtqueue_kick_prepare_split`): avail_event within
   * [old, new) with EVENT_IDX, else VRING_USED_F_NO_NOTIFY clear.
   */
  kickNeeded(): boolean {
    const oldIdx = this.#kickedAt;
    const newIdx = this.#published;
    this.#kickedAt = newIdx;
    if (this.#availEventWord !== null) {
      // Atomics.load after the seq-cst store in publish(): not reordered before it.
      return vringNeedEvent(Atomics.load(this.#availEventWord, 0), newIdx, oldIdx);
    }
    return (Atomics.load(this.#usedFlagsWord, 0) & VRING_USED_F_NO_NOTIFY) === 0;
  }

  /** Reaps one used element, freeing its descriptors; null if none is pending. */
  popUsed(): UsedElem | null {
    const usedIdx = Atomics.load(this.#usedIdxWord, 0);
    if (usedIdx === this.#lastUsed) return null;
    const o = this.#used.off + usedElemOffset(this.#lastUsed & (this.size - 1));
    const view = this.#used.region.view;
    const head = view.getUint32(o + VRING_USED_ELEM_ID, true);
    const len = view.getUint32(o + VRING_USED_ELEM_LEN, true);
    this.#lastUsed = (this.#lastUsed + 1) & 0xffff;
    if (this.#usedEventWord !== null && this.#callbacksEnabled) {
      Atomics.store(this.#usedEventWord, 0, this.#lastUsed);
    }
    if (head < this.size && this.#chainDescs[head] !== 0) {
      this.#free(head);
    } else {
      this.unexpectedUsed++;
    }
    return { head, len };
  }

  /**
   * Arms used buffer notifications (used_event = next used idx to reap, or
   * VRING_AVAIL_F_NO_INTERRUPT cleared) and returns true if used elements are
   * already pending (they raised no notification: reap them now).
   */
  enableCallbacks(): boolean {
    this.#callbacksEnabled = true;
    if (this.#usedEventWord !== null) {
      Atomics.store(this.#usedEventWord, 0, this.#lastUsed);
    } else {
      this.#availFlags &= ~VRING_AVAIL_F_NO_INTERRUPT;
      Atomics.store(this.#availFlagsWord, 0, this.#availFlags);
    }
    return Atomics.load(this.#usedIdxWord, 0) !== this.#lastUsed;
  }

  /**
   * Reaps the used ring like Linux's virtqueue callbacks: callbacks off, pop every used
   * element into `each`, callbacks on with a re-check (elements that slipped in meanwhile
   * raised no notification: reap them too). Returns how many were reaped.
   */
  drainUsed(each: (head: number, len: number) => void): number {
    let n = 0;
    for (;;) {
      this.disableCallbacks();
      for (let u = this.popUsed(); u !== null; u = this.popUsed()) {
        n++;
        each(u.head, u.len);
      }
      if (!this.enableCallbacks()) return n;
    }
  }

  /**
   * Suppresses used buffer notifications: sets VRING_AVAIL_F_NO_INTERRUPT, or
   * with EVENT_IDX moves used_event half the index space away from the next
   * used idx, where the device will not reach it soon.
   */
  disableCallbacks(): void {
    this.#callbacksEnabled = false;
    if (this.#usedEventWord !== null) {
      Atomics.store(this.#usedEventWord, 0, (this.#lastUsed + 0x8000) & 0xffff);
    } else {
      this.#availFlags |= VRING_AVAIL_F_NO_INTERRUPT;
      Atomics.store(this.#availFlagsWord, 0, this.#availFlags);
    }
  }

  // ---- raw access (fault injection and assertions) ----

  /** Writes descriptor `index` of the table verbatim (addr may be a bigint >= 2^53). */
  writeDesc(index: number, addr: number | bigint, len: number, flags: number, next: number): void {
    if (!(index >= 0 && index < this.size)) {
      throw new RangeError(`descriptor ${index} out of range`);
    }
    this.writeDescAt(this.descGpa + index * VRING_DESC_SIZE, addr, len, flags, next);
  }

  /** Writes a descriptor at any guest address (e.g. an indirect table entry). */
  writeDescAt(gpa: number, addr: number | bigint, len: number, flags: number, next: number): void {
    const p = part(this.mem, "descriptor", gpa, VRING_DESC_SIZE);
    writeDescriptor(p.region.view, p.off, addr, len, flags, next);
  }

  /** Puts any value in the next avail slot (unpublished), bypassing the free list. */
  pushAvailRaw(head: number): void {
    const o = this.#avail.off + availElemOffset(this.#availShadow & (this.size - 1));
    this.#avail.region.view.setUint16(o, head & 0xffff, true);
    this.#availShadow = (this.#availShadow + 1) & 0xffff;
  }

  /** Writes avail.idx verbatim (e.g. far beyond the entries actually added). */
  setAvailIdxRaw(idx: number): void {
    Atomics.store(this.#availIdxWord, 0, idx & 0xffff);
    this.#published = idx & 0xffff;
  }

  /** Writes avail.flags verbatim. */
  setAvailFlagsRaw(flags: number): void {
    this.#availFlags = flags & 0xffff;
    Atomics.store(this.#availFlagsWord, 0, this.#availFlags);
  }

  /** Writes used_event verbatim (EVENT_IDX only). */
  setUsedEventRaw(idx: number): void {
    if (this.#usedEventWord === null) throw new Error("used_event exists only with EVENT_IDX");
    Atomics.store(this.#usedEventWord, 0, idx & 0xffff);
  }

  /** used.idx as the device last wrote it. */
  readUsedIdx(): number {
    return Atomics.load(this.#usedIdxWord, 0);
  }

  /** used.flags as the device last wrote it. */
  readUsedFlags(): number {
    return Atomics.load(this.#usedFlagsWord, 0);
  }

  /** avail_event as the device last wrote it (EVENT_IDX only). */
  readAvailEvent(): number {
    if (this.#availEventWord === null) throw new Error("avail_event exists only with EVENT_IDX");
    return Atomics.load(this.#availEventWord, 0);
  }

  /** used.idx: a split ring's device resumes with last_avail_idx = used.idx. */
  recoveredBase(): number {
    return this.readUsedIdx();
  }

  /** Returns the descriptors of the chain at `head` to the free list. */
  #free(head: number): void {
    let n = this.#chainDescs[head];
    this.#chainDescs[head] = 0;
    this.#numFree += n;
    // Walk our own record of the chain (a chain's links are its free-list
    // links, kept in #next), not the table, which raw writes may have changed.
    let d = head;
    while (--n > 0) d = this.#next[d];
    this.#next[d] = this.#freeHead;
    this.#freeHead = head;
  }
}

interface Part {
  readonly region: MemRegion;
  readonly off: number;
}

function part(mem: GuestMemory, what: string, gpa: number, bytes: number): Part {
  const r = mem.regionOf(gpa, bytes);
  if (r < 0) throw new RangeError(`${what} [0x${gpa.toString(16)}, +${bytes}) is not in memory`);
  const region = mem.regions[r];
  return { region, off: gpa - region.gpa };
}

function word16(p: Part, fieldOff: number): Uint16Array {
  const bytes = p.region.bytes;
  return new Uint16Array(bytes.buffer, bytes.byteOffset + p.off + fieldOff, 1);
}
