/**
 * Device side of a packed virtqueue (virtio 1.3, section 2.8; VIRTIO_F_RING_PACKED).
 *
 * One ring of `size` descriptors (any size 1..32768) serves both directions. The
 * driver makes a buffer available by writing its descriptors at its next
 * positions (consecutive, linked by VIRTQ_DESC_F_NEXT, wrapping at the end of
 * the ring; the buffer id in the last one) and then the first descriptor's
 * flags, with VIRTQ_DESC_F_AVAIL equal to its wrap counter and VIRTQ_DESC_F_USED
 * the inverse. The device consumes buffers in ring order (`#availIdx`, with its
 * own avail wrap counter), and returns each by writing one used descriptor {id,
 * bytes written, AVAIL = USED = its used wrap counter} at its next used position
 * (`#usedIdx`), which then skips as many positions as the buffer occupied; buffers
 * may complete out of order.
 *
 * Everything the guest wrote is untrusted. `pop` walks a whole chain before
 * anything uses it and stores it as in-bounds segments in a `DescChain`:
 * - every descriptor of the chain must be available (the driver writes the first
 *   one's flags last), and a chain may not be longer than the ring; a chain that
 *   runs into a descriptor that is not available, or past `size` descriptors, has
 *   no buffer id to be returned by: the queue is marked `broken`;
 * - the buffer id must be below the queue size and not already in flight, else
 *   the driver lost track of its buffers: `broken`;
 * - every byte of every buffer must lie in guest memory (a buffer that crosses
 *   from one region into an adjacent one becomes two segments), readable buffers
 *   before writable ones, total length within u32;
 * - VIRTQ_DESC_F_INDIRECT only if negotiated, only alone (not with NEXT, not in a
 *   list linked by NEXT); its table must be a non-zero multiple of 16 bytes, at
 *   most `maxIndirectDescs` entries, inside one memory region. In the table only
 *   VIRTQ_DESC_F_WRITE means anything (other flags and the ids are ignored, as the
 *   spec says); the WRITE flag of the INDIRECT descriptor itself is ignored.
 * A chain that fails the last two checks is still consumed (POP_INVALID): the
 * caller returns it with used len 0. Zero-length buffers contribute no segment.
 *
 * Batching: `pushUsed` writes the used descriptors at once, but the flags of the
 * first one of a batch only in `publishUsed`, last (an Atomics store, ordered
 * after the other writes): the driver polls only its next used position, so it
 * sees the whole batch or none of it (as the spec's "Multi-buffer requests" asks).
 *
 * Notifications ("Driver and Device Event Suppression"). Used buffer notifications: `needsNotification()`
 * reads the driver event suppression structure: DISABLE -> none, ENABLE -> one per
 * decision that follows progress, DESC (with VIRTIO_RING_F_EVENT_IDX) -> whether
 * the used positions passed since the previous decision include the requested
 * descriptor (`packedNeedEvent`, as QEMU's `virtio_packed_should_notify`).
 * Available buffer notifications: `disableNotification()` writes DISABLE into the
 * device event suppression structure while draining; `enableNotification()`
 * writes ENABLE, or DESC with the offset and wrap counter of the next descriptor
 * the device will look at, and then re-reads that descriptor ("enable
 * notification, then re-check": a buffer made available between the device's
 * last look and the re-arm would never be kicked).
 *
 * Every device write to guest memory (used descriptors, the device event
 * suppression structure) is reported through `mem.markDirty`. Positions travel
 * over vhost-user as `ringBase` (packed_layout.ts `packedRingBase`). The queue keeps
 * references to the region views it was built over: build a new queue when the
 * memory table changes. Nothing here allocates per buffer.
 */

import type { DescChain } from "./desc_chain.ts";
import { type GuestMemory, HOST_LITTLE_ENDIAN, TWO_POW_32 } from "./memory.ts";
import {
  isAvailable,
  isValidPackedQueueSize,
  offWrap,
  PACKED_DESC_ADDR,
  PACKED_DESC_ALIGN,
  PACKED_DESC_FLAGS,
  PACKED_DESC_ID,
  PACKED_DESC_LEN,
  PACKED_DESC_SIZE,
  PACKED_EVENT_ALIGN,
  PACKED_EVENT_FLAGS,
  PACKED_EVENT_OFF_WRAP,
  PACKED_EVENT_SIZE,
  packedDescRingSize,
  packedNeedEvent,
  packedRingBase,
  parsePackedRingBase,
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  usedFlags,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
} from "./packed_layout.ts";
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

/** u16 words per descriptor, and the index of the flags word within one. */
const DESC_WORDS = PACKED_DESC_SIZE / 2;
const FLAGS_WORD = PACKED_DESC_FLAGS / 2;
/** Word indices of an event suppression structure. */
const EVENT_OFF_WRAP_WORD = PACKED_EVENT_OFF_WRAP / 2;
const EVENT_FLAGS_WORD = PACKED_EVENT_FLAGS / 2;
/** desc_event_flags is 2 bits; the rest of the word is reserved. */
const EVENT_FLAGS_MASK = 0x3;
/** Bytes of a used descriptor the device writes before its flags: len and id. */
const USED_LEN_ID_BYTES = PACKED_DESC_FLAGS - PACKED_DESC_LEN;

export class PackedQueue implements VirtQueue {
  readonly packed = true;
  readonly size: number;
  readonly mem: GuestMemory;
  readonly descGpa: number;
  /** driver event suppression (vhost-user's "avail" address): read by the device */
  readonly driverEventGpa: number;
  /** device event suppression (vhost-user's "used" address): written by the device */
  readonly deviceEventGpa: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  readonly notifyOnEmpty: boolean;
  readonly maxIndirectDescs: number;
  /** Why the ring is unusable (it then yields nothing), or null. */
  broken: string | null = null;
  /** Why the last POP_INVALID chain (or the ring) was rejected. */
  lastError = "";

  readonly #descView: DataView;
  readonly #descOff: number;
  /** the whole ring as u16 words, for Atomics on the flags */
  readonly #descWords: Uint16Array;
  readonly #driverEvent: Uint16Array;
  readonly #deviceEvent: Uint16Array;
  /** ring descriptors taken by each buffer id in flight (0: not in flight) */
  readonly #descsOf: Uint16Array;
  /** buffer ids in pop order (circular), for `unpop` */
  readonly #popped: Uint16Array;
  #poppedTop = 0;
  #inFlight = 0;

  /** next position to consume, and the device's avail wrap counter */
  #availIdx = 0;
  #availWrap = 1;
  /** next position to write a used descriptor at, and the device's used wrap counter */
  #usedIdx = 0;
  #usedWrap = 1;
  /** used position as last published */
  #publishedIdx = 0;
  #publishedWrap = 1;
  /** buffers pushed but not yet published, the positions they took, and the first one's flags */
  #pendingBuffers = 0;
  #pendingDescs = 0;
  #firstPos = 0;
  #firstFlags = 0;
  /** used position at the last notification decision */
  #signalledIdx = 0;
  #signalledWrap = 1;
  #signalledValid = false;
  /** used positions published since the last notification decision */
  #sinceDecision = 0;
  /** shadow of the device event suppression flags (-1: not written yet) */
  #deviceFlags = -1;

  constructor(
    size: number,
    mem: GuestMemory,
    descGpa: number,
    driverEventGpa: number,
    deviceEventGpa: number,
    options: VirtQueueOptions,
  ) {
    if (!HOST_LITTLE_ENDIAN) throw new QueueError("PackedQueue requires a little-endian host");
    if (!isValidPackedQueueSize(size)) {
      throw new QueueError(`packed queue size ${size} is not in 1..32768`);
    }
    const maxIndirect = maxIndirectDescsOf(options);
    const desc = ringPart(
      mem,
      "descriptor ring",
      descGpa,
      packedDescRingSize(size),
      PACKED_DESC_ALIGN,
    );
    const driver = ringPart(
      mem,
      "driver event suppression",
      driverEventGpa,
      PACKED_EVENT_SIZE,
      PACKED_EVENT_ALIGN,
    );
    const device = ringPart(
      mem,
      "device event suppression",
      deviceEventGpa,
      PACKED_EVENT_SIZE,
      PACKED_EVENT_ALIGN,
    );
    this.size = size;
    this.mem = mem;
    this.descGpa = descGpa;
    this.driverEventGpa = driverEventGpa;
    this.deviceEventGpa = deviceEventGpa;
    this.eventIdx = options.eventIdx;
    this.indirect = options.indirect;
    this.notifyOnEmpty = options.notifyOnEmpty ?? false;
    this.maxIndirectDescs = maxIndirect;
    this.#descView = desc.region.view;
    this.#descOff = desc.off;
    this.#descWords = ringWords(desc, 0, size * DESC_WORDS, "descriptor ring");
    this.#driverEvent = ringWords(driver, 0, 2, "driver event suppression");
    this.#deviceEvent = ringWords(device, 0, 2, "device event suppression");
    this.#descsOf = new Uint16Array(size);
    this.#popped = new Uint16Array(size);
  }

  /**
   * vhost-user's vring base of a packed ring (`packedRingBase`): next avail and
   * next used positions with their wrap counters. A fresh ring is at 0x80008000
   * (both counters start at 1), which is what QEMU sends. Setting it forgets the
   * buffers in flight; a position beyond the queue size is a QueueError.
   */
  get ringBase(): number {
    return packedRingBase({
      availIdx: this.#availIdx,
      availWrap: this.#availWrap,
      usedIdx: this.#usedIdx,
      usedWrap: this.#usedWrap,
    });
  }

  set ringBase(num: number) {
    const b = parsePackedRingBase(num);
    if (b.availIdx >= this.size || b.usedIdx >= this.size) {
      throw new QueueError(
        `packed vring base 0x${(num >>> 0).toString(16)}: position beyond queue size ${this.size}`,
      );
    }
    this.#availIdx = b.availIdx;
    this.#availWrap = b.availWrap;
    this.#usedIdx = this.#publishedIdx = this.#signalledIdx = b.usedIdx;
    this.#usedWrap = this.#publishedWrap = this.#signalledWrap = b.usedWrap;
    this.#descsOf.fill(0);
    this.#inFlight = 0;
    this.#poppedTop = 0;
    this.#pendingBuffers = 0;
    this.#pendingDescs = 0;
    this.#sinceDecision = 0;
    this.#signalledValid = false;
  }

  /** Buffers popped and not yet returned through `pushUsed`. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /**
   * Counts the complete chains available from the next position on (their
   * descriptors all available). Reads up to `size` descriptors: not for hot paths.
   */
  availableCount(): number {
    if (this.broken !== null) return 0;
    const words = this.#descWords;
    let idx = this.#availIdx;
    let wrap = this.#availWrap;
    let chains = 0;
    for (let n = 0; n < this.size; n++) {
      const flags = Atomics.load(words, idx * DESC_WORDS + FLAGS_WORD);
      if (!isAvailable(flags, wrap)) break;
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) chains++;
      if (++idx === this.size) {
        idx = 0;
        wrap ^= 1;
      }
    }
    return chains;
  }

  /** True if the next descriptor is not available. */
  isEmpty(): boolean {
    return this.broken !== null || !this.#nextAvailable();
  }

  /** See `popOrArm` in virtqueue.ts ("enable notification, then re-check"). */
  popOrArm(chain: DescChain): PopResult {
    return popOrArm(this, chain);
  }

  /**
   * Gives the buffer popped last back to the ring (see `VirtQueue.unpop`): its
   * positions become available to `pop` again. Throws if that buffer was used.
   */
  unpop(): void {
    const top = (this.#poppedTop === 0 ? this.size : this.#poppedTop) - 1;
    const id = this.#popped[top];
    const n = this.#descsOf[id];
    if (this.#inFlight === 0 || n === 0) {
      throw new Error("unpop: the buffer popped last is not in flight");
    }
    this.#poppedTop = top;
    this.#descsOf[id] = 0;
    this.#inFlight--;
    let idx = this.#availIdx - n;
    if (idx < 0) {
      idx += this.size;
      this.#availWrap ^= 1;
    }
    this.#availIdx = idx;
  }

  /** See `VirtQueue.pop`; `chain.head` is the buffer id. */
  pop(chain: DescChain): PopResult {
    if (this.broken !== null) return POP_EMPTY;
    const start = this.#availIdx;
    let wrap = this.#availWrap;
    // Atomics.load: the descriptors are read after the flags that make them available.
    let flags = Atomics.load(this.#descWords, start * DESC_WORDS + FLAGS_WORD);
    if (!isAvailable(flags, wrap)) return POP_EMPTY;
    chain.reset(this.mem, 0);
    const dv = this.#descView;
    const base = this.#descOff;
    const size = this.size;
    let err: string | null = null;
    let idx = start;
    let n = 1;
    for (;; n++) {
      if (err === null) err = this.#addDescriptor(chain, idx, flags, n);
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) break;
      if (n === size) {
        return this.#break(`chain at descriptor ${start} is longer than the ring (${size})`);
      }
      if (++idx === size) {
        idx = 0;
        wrap ^= 1;
      }
      flags = dv.getUint16(base + idx * PACKED_DESC_SIZE + PACKED_DESC_FLAGS, true);
      if (!isAvailable(flags, wrap)) {
        return this.#break(
          `chain at descriptor ${start} runs into descriptor ${idx}, which is not available ` +
            `(the chain was made available before its end)`,
        );
      }
    }
    const id = dv.getUint16(base + idx * PACKED_DESC_SIZE + PACKED_DESC_ID, true);
    if (id >= size) {
      return this.#break(`descriptor ${idx} holds buffer id ${id}, beyond queue size ${size}`);
    }
    if (this.#descsOf[id] !== 0) {
      return this.#break(`descriptor ${idx} holds buffer id ${id}, which is already in flight`);
    }
    this.#descsOf[id] = n;
    this.#popped[this.#poppedTop] = id;
    if (++this.#poppedTop === size) this.#poppedTop = 0;
    this.#inFlight++;
    if (++idx === size) {
      idx = 0;
      wrap ^= 1;
    }
    this.#availIdx = idx;
    this.#availWrap = wrap;
    chain.head = id;
    if (err === null) return POP_CHAIN;
    this.lastError = err;
    chain.invalidate();
    return POP_INVALID;
  }

  /**
   * Writes the used descriptor of buffer `id` (`len` bytes written) at the next
   * used position and advances it by the positions the buffer took. Not visible
   * to the driver until `publishUsed()`. Throws if `id` is not in flight.
   */
  pushUsed(id: number, len: number): void {
    const n = id >= 0 && id < this.size ? this.#descsOf[id] : 0;
    if (!(n > 0)) throw new RangeError(`used id ${id} is not a buffer in flight`);
    this.#descsOf[id] = 0;
    this.#inFlight--;
    const pos = this.#usedIdx;
    const o = this.#descOff + pos * PACKED_DESC_SIZE;
    this.#descView.setUint32(o + PACKED_DESC_LEN, len, true);
    this.#descView.setUint16(o + PACKED_DESC_ID, id, true);
    const flags = usedFlags(this.#usedWrap) | (len > 0 ? VIRTQ_DESC_F_WRITE : 0);
    const gpa = this.descGpa + pos * PACKED_DESC_SIZE + PACKED_DESC_LEN;
    if (this.#pendingBuffers === 0) {
      // First of the batch: its flags are written last, by publishUsed().
      this.#firstPos = pos;
      this.#firstFlags = flags;
      this.mem.markDirty(gpa, USED_LEN_ID_BYTES);
    } else {
      Atomics.store(this.#descWords, pos * DESC_WORDS + FLAGS_WORD, flags);
      this.mem.markDirty(gpa, USED_LEN_ID_BYTES + 2);
    }
    this.#pendingBuffers++;
    this.#pendingDescs += n;
    let next = pos + n;
    if (next >= this.size) {
      next -= this.size;
      this.#usedWrap ^= 1;
    }
    this.#usedIdx = next;
  }

  /** Makes the pushed buffers visible: writes the batch's first used flags, after the rest. */
  publishUsed(): void {
    if (this.#pendingBuffers === 0) return;
    const pos = this.#firstPos;
    Atomics.store(this.#descWords, pos * DESC_WORDS + FLAGS_WORD, this.#firstFlags);
    this.mem.markDirty(this.descGpa + pos * PACKED_DESC_SIZE + PACKED_DESC_FLAGS, 2);
    this.#publishedIdx = this.#usedIdx;
    this.#publishedWrap = this.#usedWrap;
    this.#sinceDecision += this.#pendingDescs;
    this.#pendingBuffers = 0;
    this.#pendingDescs = 0;
    // More than a ring's worth since the last decision: the lap test could miss the event.
    if (this.#sinceDecision > this.size) this.#signalledValid = false;
  }

  /** See `VirtQueue.needsNotification`; reads the driver event suppression structure. */
  needsNotification(): boolean {
    if (this.#sinceDecision === 0) return false;
    this.#sinceDecision = 0;
    const now = this.#publishedIdx;
    const wrap = this.#publishedWrap;
    // The previous decision's position, on this lap's scale (negative if on the previous lap).
    const old = this.#signalledWrap === wrap ? this.#signalledIdx : this.#signalledIdx - this.size;
    const valid = this.#signalledValid;
    this.#signalledIdx = now;
    this.#signalledWrap = wrap;
    this.#signalledValid = true;
    // Atomics.load: not reordered before the flags store of publishUsed(). The driver
    // writes off_wrap before switching the flags to DESC, so the flags are read first.
    const flags = Atomics.load(this.#driverEvent, EVENT_FLAGS_WORD) & EVENT_FLAGS_MASK;
    let notify: boolean;
    if (flags === RING_EVENT_FLAGS_DISABLE) {
      notify = false;
    } else if (flags === RING_EVENT_FLAGS_DESC && this.eventIdx) {
      const event = Atomics.load(this.#driverEvent, EVENT_OFF_WRAP_WORD);
      notify = !valid || packedNeedEvent(event, now, old, wrap, this.size);
    } else {
      notify = true; // ENABLE; DESC without EVENT_IDX and the reserved value count as ENABLE
    }
    if (!notify && this.notifyOnEmpty) notify = this.#inFlight === 0 && this.isEmpty();
    return notify;
  }

  /** Asks the driver not to kick: device event flags DISABLE. */
  disableNotification(): void {
    this.#setDeviceFlags(RING_EVENT_FLAGS_DISABLE);
  }

  /**
   * Re-arms available buffer notifications (ENABLE, or with EVENT_IDX DESC at the
   * next descriptor the device will look at), then re-reads that descriptor. True
   * if it is available: the driver will not kick for it, so the caller must
   * process it instead of sleeping. Unlike a split ring's, this also reports a
   * buffer the device saw before and left there (`unpop`).
   */
  enableNotification(): boolean {
    if (this.broken !== null) return false;
    if (this.eventIdx) {
      const ev = offWrap(this.#availIdx, this.#availWrap);
      Atomics.store(this.#deviceEvent, EVENT_OFF_WRAP_WORD, ev);
      this.mem.markDirty(this.deviceEventGpa + PACKED_EVENT_OFF_WRAP, 2);
      this.#setDeviceFlags(RING_EVENT_FLAGS_DESC);
    } else {
      this.#setDeviceFlags(RING_EVENT_FLAGS_ENABLE);
    }
    // Enable notification, then re-check: a buffer made available before the driver
    // could see the re-arm comes with no kick. The seq-cst stores above keep this load
    // after them.
    return this.#nextAvailable();
  }

  #nextAvailable(): boolean {
    const flags = Atomics.load(this.#descWords, this.#availIdx * DESC_WORDS + FLAGS_WORD);
    return isAvailable(flags, this.#availWrap);
  }

  #setDeviceFlags(flags: number): void {
    if (this.#deviceFlags === flags) return;
    this.#deviceFlags = flags;
    Atomics.store(this.#deviceEvent, EVENT_FLAGS_WORD, flags);
    this.mem.markDirty(this.deviceEventGpa + PACKED_EVENT_FLAGS, 2);
  }

  /** Marks the ring broken; POP_EMPTY. */
  #break(why: string): PopResult {
    this.broken = why;
    this.lastError = why;
    return POP_EMPTY;
  }

  /** Adds the `nth` descriptor of a chain, at ring position `idx`, to `c`; null or why not. */
  #addDescriptor(c: DescChain, idx: number, flags: number, nth: number): string | null {
    const dv = this.#descView;
    const o = this.#descOff + idx * PACKED_DESC_SIZE;
    const lo = dv.getUint32(o + PACKED_DESC_ADDR, true);
    const hi = dv.getUint32(o + PACKED_DESC_ADDR + 4, true);
    const len = dv.getUint32(o + PACKED_DESC_LEN, true);
    c.descCount++;
    if ((flags & VIRTQ_DESC_F_INDIRECT) !== 0) {
      if (!this.indirect) {
        return `descriptor ${idx} is INDIRECT but VIRTIO_RING_F_INDIRECT_DESC was not negotiated`;
      }
      if ((flags & VIRTQ_DESC_F_NEXT) !== 0) {
        return `descriptor ${idx} has both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT`;
      }
      if (nth !== 1) return `descriptor ${idx} is INDIRECT inside a list linked by NEXT`;
      return this.#walkIndirect(c, lo, hi, len);
    }
    const err = c.appendBuffer(lo, hi, len, (flags & VIRTQ_DESC_F_WRITE) !== 0);
    return err === null ? null : `descriptor ${idx}: ${err}`;
  }

  /** Adds every entry of an indirect table (consecutive, only WRITE meaningful) to `c`. */
  #walkIndirect(c: DescChain, lo: number, hi: number, len: number): string | null {
    const r = locateIndirectTable(this.mem, lo, hi, len, PACKED_DESC_SIZE, this.maxIndirectDescs);
    if (typeof r === "string") return r;
    const entries = len / PACKED_DESC_SIZE;
    const region = this.mem.regions[r];
    const dv = region.view;
    const base = hi * TWO_POW_32 + lo - region.gpa;
    for (let i = 0; i < entries; i++) {
      const o = base + i * PACKED_DESC_SIZE;
      c.descCount++;
      const err = c.appendBuffer(
        dv.getUint32(o + PACKED_DESC_ADDR, true),
        dv.getUint32(o + PACKED_DESC_ADDR + 4, true),
        dv.getUint32(o + PACKED_DESC_LEN, true),
        (dv.getUint16(o + PACKED_DESC_FLAGS, true) & VIRTQ_DESC_F_WRITE) !== 0,
      );
      if (err !== null) return `indirect entry ${i}: ${err}`;
    }
    return null;
  }
}
