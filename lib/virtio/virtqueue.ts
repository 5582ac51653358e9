/**
 * The device side of a virtqueue, whatever its layout (virtio 1.3, section 2.6
 * "Virtqueues"): what a device (lib/vsock) and the vhost-user back end need of a
 * queue, implemented by `SplitQueue` (split_queue.ts, section 2.7) and
 * `PackedQueue` (packed_queue.ts, section 2.8, VIRTIO_F_RING_PACKED).
 *
 * The cycle is the same for both layouts: `pop` takes the next available buffer
 * and validates it into a `DescChain` (everything the guest wrote is untrusted);
 * `pushUsed(chain.head, len)` returns it; `publishUsed()` makes what was pushed
 * visible to the driver in one step; `needsNotification()` then says whether the
 * driver wants a used buffer notification. Available buffer notifications
 * (kicks) are suppressed while the device drains the queue
 * (`disableNotification`) and re-armed when it runs dry (`enableNotification`,
 * which re-checks: "enable notification, then re-check"; `popOrArm` does both).
 *
 * This module is the one home of the definitions both layouts share: the pop
 * results, the queue's options and errors, and the helpers that locate a ring
 * part in guest memory.
 */

import type { DescChain } from "./desc_chain.ts";
import { GPA_HI_LIMIT, type GuestMemory, type MemRegion, TWO_POW_32 } from "./memory.ts";

/** The queue's configuration is unusable (bad size, ring outside memory, misaligned). */
export class QueueError extends Error {
  override name = "QueueError";
}

/** `pop` found nothing to consume (or the queue is `broken`). */
export const POP_EMPTY = 0;
/** `pop` consumed a valid chain. */
export const POP_CHAIN = 1;
/** `pop` consumed an invalid chain: return `chain.head` with used len 0; see `lastError`. */
export const POP_INVALID = 2;
export type PopResult = typeof POP_EMPTY | typeof POP_CHAIN | typeof POP_INVALID;

/**
 * Default cap on the entries of one indirect table (Linux's UIO_MAXIOV and QEMU's
 * VIRTQUEUE_MAX_SIZE): indirect tables may exceed the queue size, but not this.
 */
export const VIRTQ_INDIRECT_MAX_DESCS = 1024;

/** What the driver negotiated that changes how a queue behaves. */
export interface VirtQueueOptions {
  /** VIRTIO_RING_F_EVENT_IDX negotiated */
  readonly eventIdx: boolean;
  /** VIRTIO_RING_F_INDIRECT_DESC negotiated */
  readonly indirect: boolean;
  /** VIRTIO_F_NOTIFY_ON_EMPTY negotiated: `needsNotification` also fires when the ring ran dry */
  readonly notifyOnEmpty?: boolean;
  /** cap on indirect table entries (default VIRTQ_INDIRECT_MAX_DESCS) */
  readonly maxIndirectDescs?: number;
}

/** `options.maxIndirectDescs` or its default; QueueError unless a positive integer. */
export function maxIndirectDescsOf(options: VirtQueueOptions): number {
  const max = options.maxIndirectDescs ?? VIRTQ_INDIRECT_MAX_DESCS;
  if (!Number.isInteger(max) || max < 1) {
    throw new QueueError(`maxIndirectDescs ${max} must be a positive integer`);
  }
  return max;
}

/** The device side of one virtqueue (split or packed). */
export interface VirtQueue {
  /** Queue size (entries of the descriptor table / ring). */
  readonly size: number;
  /** True for a packed ring (VIRTIO_F_RING_PACKED), false for a split one. */
  readonly packed: boolean;
  /** Why the ring is unusable (it then yields nothing), or null. */
  readonly broken: string | null;
  /** Why the last POP_INVALID chain (or the ring) was rejected. */
  readonly lastError: string;
  /** Buffers consumed from the ring but not yet returned through `pushUsed`. */
  readonly inFlight: number;
  /**
   * The ring position as vhost-user's SET_VRING_BASE / GET_VRING_BASE carry it: a
   * split ring's next avail index (u16); a packed ring's `packedRingBase` encoding
   * (avail and used positions with their wrap counters, u32). Read it once what
   * was pushed has been published; setting it forgets buffers in flight.
   */
  ringBase: number;

  /**
   * Consumes the next available chain into `chain`. POP_EMPTY: nothing to
   * consume (check `broken`). POP_CHAIN: `chain` holds a valid chain.
   * POP_INVALID: the chain was consumed but is invalid (`lastError` says why);
   * `chain.head` is set and `chain.count` is 0: return it with used len 0.
   * Allocates nothing on success.
   */
  pop(chain: DescChain): PopResult;
  /**
   * `pop`; when the ring is empty, enables notifications and re-checks before
   * reporting POP_EMPTY ("enable notification, then re-check"), so POP_EMPTY
   * means "armed: the next buffer comes with a kick".
   */
  popOrArm(chain: DescChain): PopResult;
  /**
   * Gives the chain popped last back to the ring (the next `pop` consumes it
   * again). May be repeated, newest first, for chains popped in a row; only for
   * chains not yet passed to `pushUsed`, and before any `pushUsed` since they were popped.
   */
  unpop(): void;
  /** Returns buffer `head` (`chain.head`) with `len` bytes written; visible after `publishUsed`. */
  pushUsed(head: number, len: number): void;
  /** Makes every pushed buffer visible to the driver at once. */
  publishUsed(): void;
  /**
   * Whether the driver wants a used buffer notification for what was published
   * since the previous call (false if nothing was). Call once after each
   * `publishUsed()` that made progress, then signal the call fd if true.
   */
  needsNotification(): boolean;
  /** Asks the driver not to kick while the device drains the ring. */
  disableNotification(): void;
  /**
   * Re-arms available buffer notifications, then re-checks the ring: true if
   * buffers are waiting that the driver will not kick for, so the caller must
   * process them instead of sleeping.
   */
  enableNotification(): boolean;
  /** How many buffers wait to be consumed (never more than are really there). */
  availableCount(): number;
  /** True if no buffer waits to be consumed. */
  isEmpty(): boolean;
}

/**
 * Locates an indirect descriptor table (address as u32 halves, length in bytes)
 * of `entrySize`-byte entries: its region index, or why it is invalid (length not
 * a non-zero multiple of the entry size, more than `maxEntries` entries, not
 * inside one memory region).
 */
export function locateIndirectTable(
  mem: GuestMemory,
  lo: number,
  hi: number,
  len: number,
  entrySize: number,
  maxEntries: number,
): number | string {
  if (len === 0 || len % entrySize !== 0) {
    return `indirect table length ${len} is not a non-zero multiple of ${entrySize}`;
  }
  const entries = len / entrySize;
  if (entries > maxEntries) {
    return `indirect table has ${entries} entries, more than ${maxEntries}`;
  }
  const gpa = hi * TWO_POW_32 + lo;
  const r = hi >= GPA_HI_LIMIT ? -1 : mem.regionOf(gpa, len);
  if (r < 0) {
    return `indirect table [0x${gpa.toString(16)}, +${len}) is not inside one memory region`;
  }
  return r;
}

/** Where one part of a ring lies: inside one region, at an offset. */
export interface RingPart {
  readonly region: MemRegion;
  /** offset of the part within its region */
  readonly off: number;
}

/** Locates one ring part: inside one region, aligned; QueueError otherwise. */
export function ringPart(
  mem: GuestMemory,
  what: string,
  gpa: number,
  bytes: number,
  align: number,
): RingPart {
  if (!Number.isSafeInteger(gpa) || gpa < 0) {
    throw new QueueError(`${what} address ${gpa} is not a valid guest address`);
  }
  if (gpa % align !== 0) {
    throw new QueueError(`${what} at 0x${gpa.toString(16)} is not ${align}-byte aligned`);
  }
  const r = mem.regionOf(gpa, bytes);
  if (r < 0) {
    throw new QueueError(
      `${what} [0x${gpa.toString(16)}, +${bytes}) is not inside one guest memory region`,
    );
  }
  const region = mem.regions[r];
  return { region, off: gpa - region.gpa };
}

/** A u16 view of `count` words at `fieldOff` in a ring part, for Atomics on ring fields. */
export function ringWords(
  part: RingPart,
  fieldOff: number,
  count: number,
  what: string,
): Uint16Array {
  const bytes = part.region.bytes;
  const byteOffset = bytes.byteOffset + part.off + fieldOff;
  if (byteOffset % 2 !== 0) throw new QueueError(`${what} is not 2-byte aligned in host memory`);
  return new Uint16Array(bytes.buffer, byteOffset, count);
}

/**
 * `q.pop`; when the ring is empty, enables notifications and re-checks before reporting
 * POP_EMPTY ("enable notification, then re-check": the driver may have added buffers between
 * the empty check and the enable, seeing notifications off, and will not kick). POP_EMPTY
 * therefore means "armed: the next buffer comes with a kick". The one implementation of
 * `VirtQueue.popOrArm`, for split and packed rings alike.
 */
export function popOrArm(q: VirtQueue, chain: DescChain): PopResult {
  for (;;) {
    const r = q.pop(chain);
    if (r !== POP_EMPTY || q.broken !== null) return r;
    if (!q.enableNotification()) return POP_EMPTY;
    q.disableNotification();
  }
}
