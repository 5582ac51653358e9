/**
 * Guest memory as the virtqueues see it.
 *
 * A VMM hands the device its guest RAM as a few regions, each a contiguous run of
 * guest-physical addresses (GPAs) backed by one mapping. Virtqueue code never
 * dereferences a guest address directly: it asks `regionOf(gpa, len)` which region
 * holds the whole range, and then indexes that region's `bytes`/`view` with
 * `gpa - region.gpa`. A range no region holds entirely is out of bounds (a range
 * that spans two adjacent regions is split by the caller, one region at a time).
 *
 * Every write the device makes to guest memory is reported through `markDirty`
 * so that dirty-page logging (live migration) sees it.
 *
 * `PlainGuestMemory` implements the interface over ordinary ArrayBuffers for
 * tests; the backend's real implementation maps the front end's memfds.
 */

/** 2^32: a guest address comes as two u32 halves, `hi * TWO_POW_32 + lo`. */
export const TWO_POW_32 = 0x1_0000_0000;
/** A guest address whose high u32 half is >= 2^21 is >= 2^53: beyond any region (and a Number). */
export const GPA_HI_LIMIT = 0x20_0000;
/** Ring words and iovecs are written as u32 halves, which assumes a little-endian host. */
export const HOST_LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** One contiguous guest-physical range and its mapping in this process. */
export interface MemRegion {
  /** guest physical address of byte 0 */
  readonly gpa: number;
  /** bytes */
  readonly size: number;
  /** view of the whole region (mmap'd, or a plain buffer in tests) */
  readonly bytes: Uint8Array;
  /** same memory */
  readonly view: DataView;
  /** process address of bytes[0] (for readv/writev iovecs); 0 if none */
  readonly hostAddr: number;
}

/** The guest's memory: a set of non-overlapping regions. */
export interface GuestMemory {
  readonly regions: readonly MemRegion[];
  /** index of the region holding guest-physical [gpa, gpa+len) entirely, or -1 */
  regionOf(gpa: number, len: number): number;
  /** called after the device wrote guest-physical [gpa, gpa+len); dirty logging hook */
  markDirty(gpa: number, len: number): void;
}

/** Where a `PlainGuestMemory` region lives in guest-physical space. */
export interface PlainRegionSpec {
  readonly gpa: number;
  readonly size: number;
}

/** Receives every `markDirty` call of a `PlainGuestMemory`. */
export type DirtyCallback = (gpa: number, len: number) => void;

/**
 * Guest memory over ordinary zero-filled ArrayBuffers (tests, and the testing
 * library's guest when no real mapping is needed). `hostAddr` is 0 for every
 * region, so host iovecs built over it hold region offsets, not pointers.
 */
export class PlainGuestMemory implements GuestMemory {
  readonly regions: readonly MemRegion[];
  readonly #onDirty: DirtyCallback | undefined;

  constructor(specs: readonly PlainRegionSpec[], onDirty?: DirtyCallback) {
    const sorted = [...specs].sort((a, b) => a.gpa - b.gpa);
    for (let i = 0; i < sorted.length; i++) {
      const { gpa, size } = sorted[i];
      if (!Number.isSafeInteger(gpa) || gpa < 0) {
        throw new RangeError(`region gpa ${gpa} is not a non-negative safe integer`);
      }
      if (!Number.isSafeInteger(size) || size <= 0 || !Number.isSafeInteger(gpa + size)) {
        throw new RangeError(`region at gpa ${gpa} has invalid size ${size}`);
      }
      if (i > 0 && sorted[i - 1].gpa + sorted[i - 1].size > gpa) {
        throw new RangeError(`regions at gpa ${sorted[i - 1].gpa} and ${gpa} overlap`);
      }
    }
    this.regions = specs.map(({ gpa, size }): MemRegion => {
      const buf = new ArrayBuffer(size);
      return { gpa, size, bytes: new Uint8Array(buf), view: new DataView(buf), hostAddr: 0 };
    });
    this.#onDirty = onDirty;
  }

  regionOf(gpa: number, len: number): number {
    return findRegion(this.regions, gpa, len);
  }

  markDirty(gpa: number, len: number): void {
    if (this.#onDirty !== undefined) this.#onDirty(gpa, len);
  }
}

/**
 * Index of the region holding guest-physical [gpa, gpa+len) entirely, or -1: the one
 * implementation of `GuestMemory.regionOf`. Written so that NaN, negative lengths and huge
 * values all fail.
 */
export function findRegion(
  regions: readonly Pick<MemRegion, "gpa" | "size">[],
  gpa: number,
  len: number,
): number {
  for (let i = 0; i < regions.length; i++) {
    if (rangeInside(regions[i].gpa, regions[i].size, gpa, len)) return i;
  }
  return -1;
}

/**
 * Whether [addr, addr+len) lies inside [base, base+size): the one bounds check of guest
 * addresses. Written so that NaN, negative lengths and huge values all fail.
 */
export function rangeInside(base: number, size: number, addr: number, len: number): boolean {
  return addr >= base && len >= 0 && len <= size && addr - base <= size - len;
}

/**
 * Walks guest-physical [gpa, gpa+len) region by region (crossing adjacent regions), calling
 * `each(region, offset in region, bytes done so far, bytes in this region)`. Stops at the
 * first byte no region holds and returns how many bytes were walked: less than `len` exactly
 * when the range leaves memory (earlier pieces have been visited by then).
 */
export function walkGuest(
  mem: GuestMemory,
  gpa: number,
  len: number,
  each: (r: MemRegion, off: number, done: number, n: number) => void,
): number {
  let done = 0;
  while (done < len) {
    const i = mem.regionOf(gpa + done, 1);
    if (i < 0) return done;
    const r = mem.regions[i];
    const off = gpa + done - r.gpa;
    const n = Math.min(len - done, r.size - off);
    if (!(n > 0)) return done; // a region that does not hold the byte it was asked for
    each(r, off, done, n);
    done += n;
  }
  return done;
}

/**
 * Copies guest-physical [gpa, gpa+dst.length) into `dst`, crossing region
 * boundaries. Returns false (copying nothing) if any byte lies outside memory.
 * For tests and the testing library; the device uses `DescChain` instead.
 */
export function readGuest(mem: GuestMemory, gpa: number, dst: Uint8Array): boolean {
  if (!checkRange(mem, gpa, dst.length)) return false;
  walkGuest(
    mem,
    gpa,
    dst.length,
    (r, off, done, n) => dst.set(r.bytes.subarray(off, off + n), done),
  );
  return true;
}

/**
 * Copies `src` to guest-physical [gpa, gpa+src.length), crossing region
 * boundaries. Returns false (writing nothing) if any byte lies outside memory.
 * Does not call `markDirty` (it models the guest writing its own memory).
 */
export function writeGuest(mem: GuestMemory, gpa: number, src: Uint8Array): boolean {
  if (!checkRange(mem, gpa, src.length)) return false;
  walkGuest(
    mem,
    gpa,
    src.length,
    (r, off, done, n) => r.bytes.set(src.subarray(done, done + n), off),
  );
  return true;
}

function checkRange(mem: GuestMemory, gpa: number, len: number): boolean {
  if (walkGuest(mem, gpa, len, () => {}) < len) return false;
  return Number.isSafeInteger(gpa) && gpa >= 0;
}
