/**
 * A validated virtio descriptor chain, as guest-memory segments.
 *
 * A driver offers a buffer as a chain of descriptors (virtio 1.3, 2.7.5): first
 * the device-readable ones (the request, e.g. a vsock header and payload), then
 * the device-writable ones (room for the reply). A queue's `pop` (split_queue.ts,
 * packed_queue.ts) walks and validates a chain and stores it here, one buffer at a
 * time through `appendBuffer`, as segments: (region index, offset in the
 * region, length) triples, already split where a descriptor crosses from one
 * memory region into the next, readable segments first. Every segment lies
 * inside guest memory, so the copy helpers below and the iovecs they build never
 * touch anything else.
 *
 * One `DescChain` is allocated up front (with a fixed segment capacity) and
 * reused for every pop; nothing here allocates per packet, except `readInto` /
 * `writeFrom` for copies longer than SMALL_COPY bytes (one subarray view each).
 */

import { GPA_HI_LIMIT, type GuestMemory, HOST_LITTLE_ENDIAN, TWO_POW_32 } from "./memory.ts";

/** Copies up to this many bytes go byte by byte instead of through a subarray view. */
const SMALL_COPY = 64;
/** Region offsets below this are copied with int32 indices (faster element access). */
const INT_INDEX_LIMIT = 0x7fff_0000;

/** Largest total chain length: a used length is a u32. */
const CHAIN_MAX_BYTES = 0xffff_ffff;

/** Where each iovec of a `hostIovecs` call lies in guest memory (see its `segments`). */
export interface IovSegments {
  readonly region: Int32Array;
  readonly offset: Float64Array;
}

export class DescChain {
  /** Maximum number of segments this chain can hold. */
  readonly capacity: number;
  /** What to return in the used ring: a split ring's head index, a packed ring's buffer id. */
  head = 0;
  /** Number of segments held. */
  count = 0;
  /** Segment i: index into `mem.regions`. */
  readonly region: Int32Array;
  /** Segment i: byte offset within its region. */
  readonly offset: Float64Array;
  /** Segment i: length in bytes (never 0). */
  readonly len: Uint32Array;
  /** Segments [0, readableCount) are device-readable; the rest are device-writable. */
  readableCount = 0;
  /** Total bytes of the readable segments. */
  readableLen = 0;
  /** Total bytes of the writable segments. */
  writableLen = 0;
  /** Descriptors walked to build this chain (including indirect table entries). */
  descCount = 0;
  /** Bytes covered by the iovecs of the last `hostIovecs` call. */
  iovBytes = 0;
  /** The memory the segments refer to (set by `reset`). */
  mem: GuestMemory | null = null;

  /** while a queue builds the chain: a writable buffer was appended */
  #seenWritable = false;
  #iovWords: Uint32Array | null = null;
  #iovSource: BigUint64Array | null = null;

  constructor(capacity: number) {
    if (!Number.isInteger(capacity) || capacity < 1) {
      throw new RangeError(`DescChain capacity ${capacity} must be a positive integer`);
    }
    if (!HOST_LITTLE_ENDIAN) throw new Error("DescChain requires a little-endian host");
    this.capacity = capacity;
    this.region = new Int32Array(capacity);
    this.offset = new Float64Array(capacity);
    this.len = new Uint32Array(capacity);
  }

  /** Empties the chain for a new pop. */
  reset(mem: GuestMemory, head: number): void {
    this.mem = mem;
    this.head = head;
    this.count = 0;
    this.readableCount = 0;
    this.readableLen = 0;
    this.writableLen = 0;
    this.descCount = 0;
    this.#seenWritable = false;
  }

  /** Drops the segments of a chain that failed validation (`head` and `descCount` stay). */
  invalidate(): void {
    this.count = 0;
    this.readableCount = 0;
    this.readableLen = 0;
    this.writableLen = 0;
  }

  /**
   * Appends one descriptor's buffer (address as u32 halves, length) as segments,
   * split where it crosses from one memory region into the next. Returns null, or
   * why the buffer is invalid (outside guest memory, the chain over 2^32 - 1 bytes
   * or over `capacity` segments, a readable buffer after a writable one, even an
   * empty one: readable buffers come first).
   */
  appendBuffer(lo: number, hi: number, len: number, writable: boolean): string | null {
    if (writable) this.#seenWritable = true;
    else if (this.#seenWritable) return "device-readable buffer after a device-writable one";
    if (len === 0) return null;
    if (this.readableLen + this.writableLen + len > CHAIN_MAX_BYTES) {
      return "chain is longer than 2^32 - 1 bytes";
    }
    let gpa = hi * TWO_POW_32 + lo;
    if (hi >= GPA_HI_LIMIT || gpa > Number.MAX_SAFE_INTEGER - len) {
      return `buffer [0x${gpa.toString(16)}, +${len}) is outside guest memory`;
    }
    const mem = this.#memory();
    let remaining = len;
    while (remaining > 0) {
      // Common case first: the whole rest lies in one region.
      let r = mem.regionOf(gpa, remaining);
      let n = remaining;
      if (r < 0) {
        r = mem.regionOf(gpa, 1);
        if (r < 0) return `buffer [0x${gpa.toString(16)}, +${remaining}) is outside guest memory`;
        const region = mem.regions[r];
        n = Math.min(remaining, region.size - (gpa - region.gpa));
      }
      const k = this.count;
      if (k >= this.capacity) return `chain needs more than ${this.capacity} segments`;
      this.region[k] = r;
      this.offset[k] = gpa - mem.regions[r].gpa;
      this.len[k] = n;
      this.count = k + 1;
      gpa += n;
      remaining -= n;
    }
    if (writable) {
      this.writableLen += len;
    } else {
      this.readableLen += len;
      this.readableCount = this.count;
    }
    return null;
  }

  /** Number of writable segments. */
  get writableCount(): number {
    return this.count - this.readableCount;
  }

  /** Guest-physical address of segment i. */
  gpaOf(i: number): number {
    return this.#memory().regions[this.region[i]].gpa + this.offset[i];
  }

  /**
   * Copies readable bytes, starting `skip` bytes into the readable part, into
   * `dst` (as many as fit). Returns the number of bytes copied.
   */
  readInto(dst: Uint8Array, skip: number): number {
    const regions = this.#memory().regions;
    const want = dst.length;
    let done = 0;
    for (let i = 0; i < this.readableCount && done < want; i++) {
      const segLen = this.len[i];
      if (skip >= segLen) {
        skip -= segLen;
        continue;
      }
      const n = Math.min(segLen - skip, want - done);
      const src = regions[this.region[i]].bytes;
      const from = this.offset[i] + skip;
      if (n <= SMALL_COPY && from < INT_INDEX_LIMIT) {
        const delta = (from | 0) - done; // small integer indices keep the loop on the fast path
        for (let k = done, end = done + n; k < end; k++) dst[k] = src[k + delta];
      } else {
        dst.set(src.subarray(from, from + n), done);
      }
      done += n;
      skip = 0;
    }
    return done;
  }

  /**
   * Copies `src` into the writable part, starting `skip` bytes into it (as much
   * as fits), and marks the written guest ranges dirty. Returns bytes written.
   */
  writeFrom(src: Uint8Array, skip: number): number {
    const mem = this.#memory();
    const regions = mem.regions;
    const want = src.length;
    let done = 0;
    for (let i = this.readableCount; i < this.count && done < want; i++) {
      const segLen = this.len[i];
      if (skip >= segLen) {
        skip -= segLen;
        continue;
      }
      const n = Math.min(segLen - skip, want - done);
      const r = regions[this.region[i]];
      const to = this.offset[i] + skip;
      if (n <= SMALL_COPY && to < INT_INDEX_LIMIT) {
        const dst = r.bytes;
        const delta = (to | 0) - done;
        for (let k = done, end = done + n; k < end; k++) dst[k + delta] = src[k];
      } else {
        r.bytes.set(src.subarray(done, done + n), to);
      }
      mem.markDirty(r.gpa + to, n);
      done += n;
      skip = 0;
    }
    return done;
  }

  /**
   * Marks dirty the writable bytes [skip, skip+n) of the chain: call it after
   * something other than `writeFrom` (e.g. readv into `hostIovecs`) filled them.
   */
  markWritten(skip: number, n: number): void {
    const mem = this.#memory();
    const regions = mem.regions;
    for (let i = this.readableCount; i < this.count && n > 0; i++) {
      const segLen = this.len[i];
      if (skip >= segLen) {
        skip -= segLen;
        continue;
      }
      const m = Math.min(segLen - skip, n);
      mem.markDirty(regions[this.region[i]].gpa + this.offset[i] + skip, m);
      n -= m;
      skip = 0;
    }
  }

  /**
   * Fills `out` with (iov_base, iov_len) pairs for readv/writev over the
   * readable (`writable` false) or writable part, starting `skip` bytes into it
   * and covering at most `maxBytes`. Stops early when `out` is full. Returns the
   * number of iovecs; `iovBytes` receives the bytes they cover. With `outIndex` the pairs
   * are appended from iovec `outIndex` on (gathering several chains into one writev). `out` is written
   * through a cached 32-bit view (little-endian host), so no BigInt is created. With `segments`,
   * iovec i's guest location (region index, offset in the region) is recorded at index i too, so
   * the bytes can be found again after the chain object was reused.
   */
  hostIovecs(
    mem: GuestMemory,
    out: BigUint64Array,
    skip: number,
    maxBytes: number,
    writable: boolean,
    outIndex = 0,
    segments?: IovSegments,
  ): number {
    let words = this.#iovWords;
    if (this.#iovSource !== out || words === null) {
      words = new Uint32Array(out.buffer, out.byteOffset, out.length * 2);
      this.#iovWords = words;
      this.#iovSource = out;
    }
    const regions = mem.regions;
    const maxIov = out.length >>> 1;
    const first = writable ? this.readableCount : 0;
    const last = writable ? this.count : this.readableCount;
    let iov = outIndex;
    let bytes = 0;
    for (let i = first; i < last && bytes < maxBytes && iov < maxIov; i++) {
      const segLen = this.len[i];
      if (skip >= segLen) {
        skip -= segLen;
        continue;
      }
      const n = Math.min(segLen - skip, maxBytes - bytes);
      const base = regions[this.region[i]].hostAddr + this.offset[i] + skip;
      const w = iov * 4;
      words[w] = base % TWO_POW_32;
      words[w + 1] = Math.floor(base / TWO_POW_32);
      words[w + 2] = n;
      words[w + 3] = 0;
      if (segments !== undefined) {
        segments.region[iov] = this.region[i];
        segments.offset[iov] = this.offset[i] + skip;
      }
      bytes += n;
      iov++;
      skip = 0;
    }
    this.iovBytes = bytes;
    return iov - outIndex;
  }

  #memory(): GuestMemory {
    const mem = this.mem;
    if (mem === null) throw new Error("DescChain used before any pop");
    return mem;
  }
}
