/**
 * Device side of a split virtqueue (virtio 1.3, section 2.7).
 *
 * The driver publishes buffers by writing descriptor chains into the descriptor
 * table, their head indices into the available ring, and then `avail.idx`. The
 * device consumes them in order (`lastAvail` is the next avail index to take),
 * and returns each head with the number of bytes it wrote in the used ring,
 * publishing `used.idx` after the elements.
 *
 * Everything the guest wrote is untrusted. `pop` validates a whole chain before
 * anything uses it and stores it as in-bounds segments in a `DescChain`:
 * - head and `next` indices must be below the queue size (table size for indirect);
 * - a chain may not walk more descriptors than the queue size (loops);
 * - every byte of every buffer must lie in guest memory (a buffer that crosses
 *   from one region into an adjacent one becomes two segments);
 * - readable descriptors come first: a readable one after a writable one is rejected;
 * - total length must fit in u32;
 * - VRING_DESC_F_INDIRECT only if negotiated, never together with NEXT, never
 *   inside an indirect table; a table must be a non-zero multiple of 16 bytes,
 *   at most `maxIndirectDescs` entries, inside one memory region. As the spec
 *   requires of devices, zero or more direct descriptors followed by one indirect
 *   descriptor are accepted, and the WRITE flag of that descriptor is ignored.
 * Zero-length descriptors are accepted and contribute no segment.
 * A chain that fails validation is still consumed (POP_INVALID): the caller
 * returns it with used len 0. A ring that is corrupt as a whole (avail.idx more
 * than `size` ahead, a head index out of range) marks the queue `broken`, after
 * which it yields nothing.
 *
 * Notifications (2.7.7 - 2.7.10). Used buffer notifications: after publishing,
 * `needsNotification()` applies VRING_AVAIL_F_NO_INTERRUPT or, with
 * VIRTIO_RING_F_EVENT_IDX, `vring_need_event(used_event, new, old)` where old is
 * the used idx at the previous decision (as Linux vhost `vhost_notify` and QEMU
 * `virtio_split_should_notify` do), so a batch of several used entries is one
 * decision. Available buffer notifications: `disableNotification()` while
 * draining, then `enableNotification()` which re-arms (VRING_USED_F_NO_NOTIFY
 * cleared, or avail_event = the avail idx the device has seen) and re-reads
 * avail.idx: buffers published between the device's last look and the re-arm
 * would never be kicked, so the caller must keep going when it returns true
 * ("enable notification, then re-check": virtio-net stalled forever on exactly this).
 *
 * Memory ordering: the ring indices are read and written with `Atomics` on
 * 16-bit views of the region, so the used.idx store is ordered after the used
 * elements, the loads after a re-arm cannot pass the re-arm store (seq-cst),
 * and ring entries are read after the avail.idx that covers them.
 *
 * The queue keeps references to the region views it was built over: build a new
 * queue when the memory table changes. Packed rings: packed_queue.ts; the
 * interface both implement, and the definitions they share: virtqueue.ts.
 */

import type { DescChain } from "./desc_chain.ts";
import { type GuestMemory, HOST_LITTLE_ENDIAN, TWO_POW_32 } from "./memory.ts";
import {
  availElemOffset,
  availEventOffset,
  availRingSize,
  descTableSize,
  isValidQueueSize,
  usedElemOffset,
  usedEventOffset,
  usedRingSize,
  VRING_AVAIL_ALIGN,
  VRING_AVAIL_F_NO_INTERRUPT,
  VRING_AVAIL_FLAGS,
  VRING_AVAIL_IDX,
  VRING_DESC_ADDR,
  VRING_DESC_ALIGN,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_DESC_FLAGS,
  VRING_DESC_LEN,
  VRING_DESC_NEXT,
  VRING_DESC_SIZE,
  VRING_USED_ALIGN,
  VRING_USED_ELEM_ID,
  VRING_USED_ELEM_LEN,
  VRING_USED_ELEM_SIZE,
  VRING_USED_F_NO_NOTIFY,
  VRING_USED_FLAGS,
  VRING_USED_IDX,
  vringNeedEvent,
} from "./split_layout.ts";
import {
  locateIndirectTable,
  maxIndirectDescsOf,
  POP_CHAIN,
  POP_EMPTY,
  POP_INVALID,
  popOrArm,
  type PopResult,
  QueueError,
  ringPart,
  ringWords,
  type VirtQueue,
  type VirtQueueOptions,
} from "./virtqueue.ts";

export class SplitQueue implements VirtQueue {
  readonly packed = false;
  readonly size: number;
  readonly mem: GuestMemory;
  readonly descGpa: number;
  readonly availGpa: number;
  readonly usedGpa: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  readonly notifyOnEmpty: boolean;
  readonly maxIndirectDescs: number;
  /** Why the ring is unusable (it then yields nothing), or null. */
  broken: string | null = null;
  /** Why the last POP_INVALID chain (or the ring) was rejected. */
  lastError = "";

  readonly #mask: number;
  readonly #descView: DataView;
  readonly #descOff: number;
  readonly #availView: DataView;
  readonly #availOff: number;
  readonly #usedView: DataView;
  readonly #usedOff: number;
  readonly #availIdxWord: Uint16Array;
  readonly #usedIdxWord: Uint16Array;
  readonly #usedFlagsWord: Uint16Array;
  readonly #availEventWord: Uint16Array | null;
  readonly #availFlagsWord: Uint16Array;
  readonly #usedEventWord: Uint16Array | null;

  /** next avail index to consume */
  #lastAvail = 0;
  /** avail.idx as last read */
  #shadowAvail = 0;
  /** next used index to fill */
  #usedIdx = 0;
  /** used.idx as last written */
  #publishedUsed = 0;
  /** used entries pushed but not yet published */
  #pendingUsed = 0;
  /** used idx at the last notification decision */
  #signalledUsed = 0;
  #signalledValid = false;
  /** used entries published since the last notification decision */
  #sinceDecision = 0;
  /** shadow of used.flags (owned by the device) */
  #usedFlags = 0;

  constructor(
    size: number,
    mem: GuestMemory,
    descGpa: number,
    availGpa: number,
    usedGpa: number,
    options: VirtQueueOptions,
  ) {
    if (!HOST_LITTLE_ENDIAN) throw new QueueError("SplitQueue requires a little-endian host");
    if (!isValidQueueSize(size)) {
      throw new QueueError(`queue size ${size} is not a power of 2 in 1..32768`);
    }
    const eventIdx = options.eventIdx;
    const maxIndirect = maxIndirectDescsOf(options);
    const desc = ringPart(mem, "descriptor table", descGpa, descTableSize(size), VRING_DESC_ALIGN);
    const avail = ringPart(
      mem,
      "available ring",
      availGpa,
      availRingSize(size, eventIdx),
      VRING_AVAIL_ALIGN,
    );
    const used = ringPart(
      mem,
      "used ring",
      usedGpa,
      usedRingSize(size, eventIdx),
      VRING_USED_ALIGN,
    );

    this.size = size;
    this.mem = mem;
    this.descGpa = descGpa;
    this.availGpa = availGpa;
    this.usedGpa = usedGpa;
    this.eventIdx = eventIdx;
    this.indirect = options.indirect;
    this.notifyOnEmpty = options.notifyOnEmpty ?? false;
    this.maxIndirectDescs = maxIndirect;
    this.#mask = size - 1;
    this.#descView = desc.region.view;
    this.#descOff = desc.off;
    this.#availView = avail.region.view;
    this.#availOff = avail.off;
    this.#usedView = used.region.view;
    this.#usedOff = used.off;
    this.#availIdxWord = ringWords(avail, VRING_AVAIL_IDX, 1, "avail.idx");
    this.#usedIdxWord = ringWords(used, VRING_USED_IDX, 1, "used.idx");
    this.#usedFlagsWord = ringWords(used, VRING_USED_FLAGS, 1, "used.flags");
    this.#availEventWord = eventIdx
      ? ringWords(used, availEventOffset(size), 1, "avail_event")
      : null;
    this.#availFlagsWord = ringWords(avail, VRING_AVAIL_FLAGS, 1, "avail.flags");
    this.#usedEventWord = eventIdx
      ? ringWords(avail, usedEventOffset(size), 1, "used_event")
      : null;

    // Like Linux vhost (vhost_vq_init_access): the used index lives in guest memory.
    this.#usedIdx = Atomics.load(this.#usedIdxWord, 0);
    this.#publishedUsed = this.#usedIdx;
    this.#signalledUsed = this.#usedIdx;
    this.#usedFlags = Atomics.load(this.#usedFlagsWord, 0);
  }

  /** Next avail index to consume (GET_VRING_BASE reports it, SET_VRING_BASE sets it). */
  get lastAvail(): number {
    return this.#lastAvail;
  }

  set lastAvail(value: number) {
    this.#lastAvail = value & 0xffff;
    this.#shadowAvail = this.#lastAvail;
    this.#signalledValid = false;
  }

  /** vhost-user's vring base of a split ring: `lastAvail`. */
  get ringBase(): number {
    return this.#lastAvail;
  }

  set ringBase(value: number) {
    this.lastAvail = value;
  }

  /** Next used index to fill (shadow of used.idx; read from the ring at construction). */
  get usedIdx(): number {
    return this.#usedIdx;
  }

  set usedIdx(value: number) {
    this.#usedIdx = value & 0xffff;
    this.#publishedUsed = this.#usedIdx;
    this.#pendingUsed = 0;
    this.#signalledValid = false;
  }

  /** Chains consumed from the avail ring but not yet returned through the used ring. */
  get inFlight(): number {
    return (this.#lastAvail - this.#usedIdx) & 0xffff;
  }

  /**
   * Reads avail.idx and returns how many entries wait to be consumed. A count
   * above the queue size means the driver corrupted the ring: the queue is
   * marked `broken` and 0 is returned.
   */
  availableCount(): number {
    if (this.broken !== null) return 0;
    return this.#refreshAvail();
  }

  /** True if the avail ring holds nothing to consume (re-reads avail.idx). */
  isEmpty(): boolean {
    return this.availableCount() === 0;
  }

  /** See `popOrArm` in virtqueue.ts ("enable notification, then re-check"). */
  popOrArm(chain: DescChain): PopResult {
    return popOrArm(this, chain);
  }

  /**
   * Gives the chain popped last back to the avail ring (it is consumed again by
   * the next `pop`). For a device that popped a buffer and then found nothing to
   * put in it; only valid right after a successful `pop`, before `pushUsed`.
   */
  unpop(): void {
    this.#lastAvail = (this.#lastAvail - 1) & 0xffff;
  }

  /**
   * Consumes the next available chain into `chain`. POP_EMPTY: nothing to
   * consume (check `broken`). POP_CHAIN: `chain` holds a valid chain.
   * POP_INVALID: the chain was consumed but is invalid (`lastError` says why);
   * `chain.head` is set and `chain.count` is 0: return it with used len 0.
   * Allocates nothing on success.
   */
  pop(chain: DescChain): PopResult {
    if (this.broken !== null) return POP_EMPTY;
    if (this.#lastAvail === this.#shadowAvail && this.#refreshAvail() === 0) return POP_EMPTY;
    const slot = this.#lastAvail & this.#mask;
    const head = this.#availView.getUint16(this.#availOff + availElemOffset(slot), true);
    chain.reset(this.mem, head);
    if (head >= this.size) {
      this.broken = `avail.ring[${slot}] holds head ${head}, beyond queue size ${this.size}`;
      this.lastError = this.broken;
      return POP_EMPTY;
    }
    this.#lastAvail = (this.#lastAvail + 1) & 0xffff;
    const err = this.#walk(chain, head);
    if (err === null) return POP_CHAIN;
    this.lastError = err;
    chain.invalidate();
    return POP_INVALID;
  }

  /**
   * Writes used element (head, len) at the used index and advances the shadow.
   * Not visible to the driver until `publishUsed()`.
   */
  pushUsed(head: number, len: number): void {
    if (!(head >= 0 && head < this.size) || !Number.isInteger(head)) {
      throw new RangeError(`used head ${head} is not a descriptor index below ${this.size}`);
    }
    const slot = this.#usedIdx & this.#mask;
    const elem = usedElemOffset(slot);
    const o = this.#usedOff + elem;
    this.#usedView.setUint32(o + VRING_USED_ELEM_ID, head, true);
    this.#usedView.setUint32(o + VRING_USED_ELEM_LEN, len, true);
    this.mem.markDirty(this.usedGpa + elem, VRING_USED_ELEM_SIZE);
    this.#usedIdx = (this.#usedIdx + 1) & 0xffff;
    this.#pendingUsed++;
  }

  /** Makes the pushed used elements visible: writes used.idx (after the elements). */
  publishUsed(): void {
    if (this.#pendingUsed === 0) return;
    Atomics.store(this.#usedIdxWord, 0, this.#usedIdx);
    this.mem.markDirty(this.usedGpa + VRING_USED_IDX, 2);
    this.#publishedUsed = this.#usedIdx;
    this.#sinceDecision += this.#pendingUsed;
    this.#pendingUsed = 0;
    // More than 2^16 entries since the last decision: the u16 window wrapped
    // past signalledUsed and vring_need_event could miss used_event.
    if (this.#sinceDecision >= 0x10000) this.#signalledValid = false;
  }

  /**
   * Whether the driver wants a used buffer notification for what was published
   * since the previous call (false if nothing was). Call once after each
   * `publishUsed()` that made progress, then signal the call fd if true.
   */
  needsNotification(): boolean {
    if (this.#sinceDecision === 0) return false;
    this.#sinceDecision = 0;
    let notify: boolean;
    const usedEvent = this.#usedEventWord;
    if (usedEvent !== null) {
      const old = this.#signalledUsed;
      const valid = this.#signalledValid;
      const now = this.#publishedUsed;
      this.#signalledUsed = now;
      this.#signalledValid = true;
      // Atomics.load: not reordered before the used.idx store of publishUsed().
      notify = !valid || vringNeedEvent(Atomics.load(usedEvent, 0), now, old);
    } else {
      notify = (Atomics.load(this.#availFlagsWord, 0) & VRING_AVAIL_F_NO_INTERRUPT) === 0;
    }
    if (!notify && this.notifyOnEmpty) notify = this.inFlight === 0 && this.isEmpty();
    return notify;
  }

  /**
   * Asks the driver not to kick while the device is draining the ring: sets
   * VRING_USED_F_NO_NOTIFY. With EVENT_IDX this is a no-op (avail_event already
   * stops kicks once the driver has passed it).
   */
  disableNotification(): void {
    if (this.eventIdx || (this.#usedFlags & VRING_USED_F_NO_NOTIFY) !== 0) return;
    this.#usedFlags |= VRING_USED_F_NO_NOTIFY;
    Atomics.store(this.#usedFlagsWord, 0, this.#usedFlags);
    this.mem.markDirty(this.usedGpa + VRING_USED_FLAGS, 2);
  }

  /**
   * Re-arms available buffer notifications (avail_event = the avail idx last
   * seen, or VRING_USED_F_NO_NOTIFY cleared), then re-reads avail.idx. Returns
   * true if the driver published buffers since the device last looked: those
   * will not be kicked, so the caller must process them instead of sleeping.
   * Entries seen earlier but left unconsumed do not count (see availableCount).
   */
  enableNotification(): boolean {
    if (this.broken !== null) return false;
    if (this.#availEventWord !== null) {
      Atomics.store(this.#availEventWord, 0, this.#shadowAvail);
      this.mem.markDirty(this.usedGpa + availEventOffset(this.size), 2);
    } else {
      this.#usedFlags &= ~VRING_USED_F_NO_NOTIFY;
      Atomics.store(this.#usedFlagsWord, 0, this.#usedFlags);
      this.mem.markDirty(this.usedGpa + VRING_USED_FLAGS, 2);
    }
    const seen = this.#shadowAvail;
    this.#refreshAvail();
    return this.broken === null && this.#shadowAvail !== seen;
  }

  /** Reads avail.idx into the shadow; returns the entries waiting, or 0 and marks broken. */
  #refreshAvail(): number {
    const idx = Atomics.load(this.#availIdxWord, 0);
    const n = (idx - this.#lastAvail) & 0xffff;
    if (n > this.size) {
      this.broken = `avail.idx ${idx} is ${n} entries ahead of last_avail_idx ` +
        `${this.#lastAvail}, beyond queue size ${this.size}`;
      this.lastError = this.broken;
      return 0;
    }
    this.#shadowAvail = idx;
    return n;
  }

  /** Walks the chain at `head` into `c`; returns null or why it is invalid. */
  #walk(c: DescChain, head: number): string | null {
    const dv = this.#descView;
    const base = this.#descOff;
    const size = this.size;
    let idx = head;
    for (let walked = 1;; walked++) {
      if (walked > size) {
        return `chain at head ${head} is longer than the queue size ${size} (loop?)`;
      }
      const o = base + idx * VRING_DESC_SIZE;
      const lo = dv.getUint32(o + VRING_DESC_ADDR, true);
      const hi = dv.getUint32(o + VRING_DESC_ADDR + 4, true);
      const len = dv.getUint32(o + VRING_DESC_LEN, true);
      const flags = dv.getUint16(o + VRING_DESC_FLAGS, true);
      c.descCount++;
      if ((flags & VRING_DESC_F_INDIRECT) !== 0) {
        if (!this.indirect) {
          return `descriptor ${idx} is INDIRECT but VIRTIO_RING_F_INDIRECT_DESC was not negotiated`;
        }
        if ((flags & VRING_DESC_F_NEXT) !== 0) {
          return `descriptor ${idx} has both VRING_DESC_F_INDIRECT and VRING_DESC_F_NEXT`;
        }
        return this.#walkIndirect(c, lo, hi, len);
      }
      const err = c.appendBuffer(lo, hi, len, (flags & VRING_DESC_F_WRITE) !== 0);
      if (err !== null) return `descriptor ${idx}: ${err}`;
      if ((flags & VRING_DESC_F_NEXT) === 0) return null;
      const next = dv.getUint16(o + VRING_DESC_NEXT, true);
      if (next >= size) return `descriptor ${idx}: next ${next} is beyond queue size ${size}`;
      idx = next;
    }
  }

  /** Walks an indirect table (the last descriptor of a chain) into `c`. */
  #walkIndirect(c: DescChain, lo: number, hi: number, len: number): string | null {
    const r = locateIndirectTable(this.mem, lo, hi, len, VRING_DESC_SIZE, this.maxIndirectDescs);
    if (typeof r === "string") return r;
    const entries = len / VRING_DESC_SIZE;
    const region = this.mem.regions[r];
    const dv = region.view;
    const base = hi * TWO_POW_32 + lo - region.gpa;
    let i = 0;
    for (let walked = 1;; walked++) {
      if (walked > entries) return `indirect chain is longer than its table (${entries}): loop`;
      const o = base + i * VRING_DESC_SIZE;
      const flags = dv.getUint16(o + VRING_DESC_FLAGS, true);
      c.descCount++;
      if ((flags & VRING_DESC_F_INDIRECT) !== 0) {
        return `indirect entry ${i} is itself INDIRECT (nested tables are not allowed)`;
      }
      const err = c.appendBuffer(
        dv.getUint32(o + VRING_DESC_ADDR, true),
        dv.getUint32(o + VRING_DESC_ADDR + 4, true),
        dv.getUint32(o + VRING_DESC_LEN, true),
        (flags & VRING_DESC_F_WRITE) !== 0,
      );
      if (err !== null) return `indirect entry ${i}: ${err}`;
      if ((flags & VRING_DESC_F_NEXT) === 0) return null;
      const next = dv.getUint16(o + VRING_DESC_NEXT, true);
      if (next >= entries) return `indirect entry ${i}: next ${next} is beyond the table`;
      i = next;
    }
  }
}
