/**
 * Guest RAM for the testing library: the memory a VMM gives its guest, made the way QEMU
 * (`memory-backend-memfd,share=on`) and crosvm make it, so a vhost-user back end maps the very
 * same pages.
 *
 * Each region is a run of guest-physical addresses (GPAs) backed by a memfd mapped
 * `MAP_SHARED` in this process. A region's `hostAddr` is the real address of that mapping: it
 * is what a VMM sends as `userspace_addr` in SET_MEM_TABLE / ADD_MEM_REG and what ring
 * addresses in SET_VRING_ADDR are expressed in ("front-end virtual addresses"). With
 * `singleMemfd` every region is a slice of one memfd at a growing `mmap_offset`, as QEMU lays
 * out RAM split around the PCI hole, so a back end that ignores `mmap_offset` maps the wrong
 * pages and fails visibly.
 *
 * The guest driver emulator carves its rings and buffers out of this memory with a small
 * first-fit allocator (`alloc` / `free`). A block never crosses a region boundary; tests that
 * want a buffer straddling two adjacent regions write raw descriptors instead (see faults.ts).
 *
 * `GuestRam` implements the project's `GuestMemory` interface, so the layout helpers in
 * `lib/virtio` and `DriverSplitQueue` work on it directly.
 */

import { close, type Mapping, mapShared, memfdCreate, unmap } from "../../ffi/mod.ts";
import { findRegion, type GuestMemory, type MemRegion, walkGuest } from "../virtio/memory.ts";

/** Page size: region addresses, sizes and mmap offsets must be multiples of it. */
export const GUEST_PAGE_SIZE = 4096;
/** Default guest RAM: one 16 MiB region at guest-physical address 0. */
export const DEFAULT_GUEST_RAM_SIZE = 16 * 1024 * 1024;

/** Where a region lives in guest-physical space. */
export interface GuestRamRegionSpec {
  /** guest-physical address of byte 0 (a multiple of 4096) */
  readonly gpa: number;
  /** bytes (a multiple of 4096) */
  readonly size: number;
}

/** Options of `new GuestRam`. */
export interface GuestRamOptions {
  /** the regions (default: one 16 MiB region at gpa 0); at most 32, non-overlapping */
  readonly regions?: readonly GuestRamRegionSpec[];
  /** back every region with one memfd at increasing mmap offsets (default false: one each) */
  readonly singleMemfd?: boolean;
  /** memfd name prefix, visible in /proc/<pid>/maps (default "guest-ram") */
  readonly name?: string;
}

/** One mapped region of guest RAM. */
export interface GuestRamRegion extends MemRegion {
  /** position in `GuestRam.regions` */
  readonly index: number;
  /** the memfd backing the region (shared by all regions with `singleMemfd`) */
  readonly fd: number;
  /** offset of the region's first byte in `fd` (vhost-user `mmap_offset`) */
  readonly mmapOffset: number;
}

/** Thrown when the allocator cannot satisfy a request: the message says how much is missing. */
export class GuestRamExhaustedError extends Error {
  override name = "GuestRamExhaustedError";
}

interface FreeBlock {
  start: number;
  end: number;
}

/** Most regions a GuestRam holds (the back end's VHOST_USER_MAX_RAM_SLOTS). */
export const MAX_GUEST_RAM_REGIONS = 32;

/** Guest RAM: memfd-backed regions mapped in this process, plus an allocator over them. */
export class GuestRam implements GuestMemory {
  readonly #regions: GuestRamRegion[] = [];
  readonly #mappings: Mapping[] = [];
  readonly #fds = new Set<number>();
  /** per region: free blocks sorted by address */
  readonly #free: FreeBlock[][] = [];
  /** allocated block start (aligned gpa) -> [region index, block start, block end] */
  readonly #allocated = new Map<number, [number, number, number]>();
  readonly #name: string;
  #closed = false;

  constructor(options: GuestRamOptions = {}) {
    const specs = options.regions ?? [{ gpa: 0, size: DEFAULT_GUEST_RAM_SIZE }];
    this.#name = options.name ?? "guest-ram";
    if (specs.length === 0) throw new RangeError("guest RAM needs at least one region");
    if (specs.length > MAX_GUEST_RAM_REGIONS) {
      throw new RangeError(`guest RAM: ${specs.length} regions > ${MAX_GUEST_RAM_REGIONS}`);
    }
    for (const s of specs) checkSpec(s);
    checkOverlaps(specs);
    try {
      if (options.singleMemfd) {
        const total = specs.reduce((n, s) => n + s.size, 0);
        const fd = memfdCreate(`${this.#name}`, total);
        this.#fds.add(fd);
        let off = 0;
        for (const s of specs) {
          this.#map(s, fd, off);
          off += s.size;
        }
      } else {
        for (const s of specs) {
          const fd = memfdCreate(`${this.#name}-${this.#regions.length}`, s.size);
          this.#fds.add(fd);
          this.#map(s, fd, 0);
        }
      }
    } catch (e) {
      this.close();
      throw e;
    }
  }

  /**
   * Hot-plugs one more region (its own memfd). The back end learns about it only when the
   * front end sends ADD_MEM_REG or a new SET_MEM_TABLE.
   */
  addRegion(spec: GuestRamRegionSpec): GuestRamRegion {
    this.#checkOpen();
    checkSpec(spec);
    if (this.#regions.length >= MAX_GUEST_RAM_REGIONS) {
      throw new RangeError(`guest RAM already has ${MAX_GUEST_RAM_REGIONS} regions`);
    }
    checkOverlaps([...this.#regions, spec]);
    const fd = memfdCreate(`${this.#name}-${this.#regions.length}`, spec.size);
    this.#fds.add(fd);
    try {
      return this.#map(spec, fd, 0);
    } catch (e) {
      close(fd);
      this.#fds.delete(fd);
      throw e;
    }
  }

  #map(spec: GuestRamRegionSpec, fd: number, mmapOffset: number): GuestRamRegion {
    const m = mapShared(fd, spec.size, mmapOffset);
    this.#mappings.push(m);
    const region: GuestRamRegion = {
      index: this.#regions.length,
      gpa: spec.gpa,
      size: spec.size,
      bytes: m.bytes,
      view: new DataView(m.bytes.buffer, m.bytes.byteOffset, m.bytes.byteLength),
      hostAddr: m.addr,
      fd,
      mmapOffset,
    };
    this.#regions.push(region);
    this.#free.push([{ start: spec.gpa, end: spec.gpa + spec.size }]);
    return region;
  }

  /** The mapped regions, in creation order. */
  get regions(): readonly GuestRamRegion[] {
    return this.#regions;
  }

  /** Total bytes of guest RAM. */
  get totalSize(): number {
    return this.#regions.reduce((n, r) => n + r.size, 0);
  }

  /** First guest-physical address above every region. */
  get topGpa(): number {
    return this.#regions.reduce((n, r) => Math.max(n, r.gpa + r.size), 0);
  }

  /** Index of the region holding [gpa, gpa+len) entirely, or -1. */
  regionOf(gpa: number, len: number): number {
    return findRegion(this.#regions, gpa, len);
  }

  /** Guest writes are not logged (dirty logging is the back end's job). */
  markDirty(_gpa: number, _len: number): void {}

  /** The front-end virtual address of guest-physical `gpa`; throws outside RAM. */
  gpaToUser(gpa: number, len = 1): number {
    const i = this.regionOf(gpa, len);
    if (i < 0) throw new RangeError(`guest range [0x${gpa.toString(16)}, +${len}) is not in RAM`);
    const r = this.#regions[i];
    return r.hostAddr + (gpa - r.gpa);
  }

  /** A live view of guest-physical [gpa, gpa+len), which must lie in one region. */
  bytesAt(gpa: number, len: number): Uint8Array {
    const i = this.regionOf(gpa, len);
    if (i < 0) throw new RangeError(`guest range [0x${gpa.toString(16)}, +${len}) is not in RAM`);
    const r = this.#regions[i];
    return r.bytes.subarray(gpa - r.gpa, gpa - r.gpa + len);
  }

  /** Copies `src` to guest-physical `gpa` (may cross adjacent regions); throws outside RAM. */
  write(gpa: number, src: Uint8Array): void {
    const walked = walkGuest(
      this,
      gpa,
      src.length,
      (r, off, done, n) => r.bytes.set(src.subarray(done, done + n), off),
    );
    if (walked < src.length) {
      throw new RangeError(`guest write at 0x${(gpa + walked).toString(16)} is outside RAM`);
    }
  }

  /** A copy of guest-physical [gpa, gpa+len) (may cross adjacent regions). */
  read(gpa: number, len: number): Uint8Array {
    const out = new Uint8Array(len);
    const walked = walkGuest(
      this,
      gpa,
      len,
      (r, off, done, n) => out.set(r.bytes.subarray(off, off + n), done),
    );
    if (walked < len) {
      throw new RangeError(`guest read at 0x${(gpa + walked).toString(16)} is outside RAM`);
    }
    return out;
  }

  /**
   * Allocates `size` bytes aligned to `align` (a power of 2), first fit, lowest address
   * first; `region` restricts the search to one region. Returns the guest-physical address.
   * The block is zero-filled. Throws GuestRamExhaustedError when nothing fits.
   */
  alloc(size: number, align = 16, region?: number): number {
    this.#checkOpen();
    if (!Number.isSafeInteger(size) || size <= 0) {
      throw new RangeError(`bad allocation size ${size}`);
    }
    if (!Number.isSafeInteger(align) || align <= 0 || (align & (align - 1)) !== 0) {
      throw new RangeError(`alignment ${align} is not a power of 2`);
    }
    const order = region === undefined
      ? this.#regions.map((r) => r.index).sort((a, b) =>
        this.#regions[a].gpa - this.#regions[b].gpa
      )
      : [region];
    for (const ri of order) {
      const list = this.#free[ri];
      if (list === undefined) throw new RangeError(`no region ${ri}`);
      for (let k = 0; k < list.length; k++) {
        const b = list[k];
        const start = Math.ceil(b.start / align) * align;
        if (start + size > b.end) continue;
        const pieces: FreeBlock[] = [];
        if (start > b.start) pieces.push({ start: b.start, end: start });
        if (start + size < b.end) pieces.push({ start: start + size, end: b.end });
        list.splice(k, 1, ...pieces);
        this.#allocated.set(start, [ri, start, start + size]);
        this.bytesAt(start, size).fill(0);
        return start;
      }
    }
    throw new GuestRamExhaustedError(
      `guest RAM exhausted: no free block of ${size} bytes (align ${align})` +
        `${region === undefined ? "" : ` in region ${region}`}; ${this.freeBytes()} bytes free ` +
        `in total. Give the VM more RAM (regions option) or fewer/smaller buffers.`,
    );
  }

  /** Returns a block from `alloc` to the free list. Throws for an address alloc never returned. */
  free(gpa: number): void {
    const a = this.#allocated.get(gpa);
    if (a === undefined) throw new RangeError(`0x${gpa.toString(16)} is not an allocated block`);
    this.#allocated.delete(gpa);
    const [ri, start, end] = a;
    const list = this.#free[ri];
    let k = 0;
    while (k < list.length && list[k].start < start) k++;
    list.splice(k, 0, { start, end });
    // merge with neighbours
    if (k + 1 < list.length && list[k].end === list[k + 1].start) {
      list[k].end = list[k + 1].end;
      list.splice(k + 1, 1);
    }
    if (k > 0 && list[k - 1].end === list[k].start) {
      list[k - 1].end = list[k].end;
      list.splice(k, 1);
    }
  }

  /** Bytes not allocated, over all regions. */
  freeBytes(): number {
    let n = 0;
    for (const list of this.#free) for (const b of list) n += b.end - b.start;
    return n;
  }

  /** Whether `close()` was called. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Unmaps every region and closes the memfds. Views obtained earlier must not be used. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const m of this.#mappings) unmap(m);
    this.#mappings.length = 0;
    for (const fd of this.#fds) close(fd);
    this.#fds.clear();
  }

  #checkOpen(): void {
    if (this.#closed) throw new Error("guest RAM is closed");
  }
}

function checkSpec(s: GuestRamRegionSpec): void {
  if (!Number.isSafeInteger(s.gpa) || s.gpa < 0 || s.gpa % GUEST_PAGE_SIZE !== 0) {
    throw new RangeError(`region gpa ${s.gpa} is not a non-negative multiple of 4096`);
  }
  if (!Number.isSafeInteger(s.size) || s.size <= 0 || s.size % GUEST_PAGE_SIZE !== 0) {
    throw new RangeError(`region size ${s.size} is not a positive multiple of 4096`);
  }
  if (!Number.isSafeInteger(s.gpa + s.size)) throw new RangeError(`region end beyond 2^53`);
}

function checkOverlaps(specs: readonly GuestRamRegionSpec[]): void {
  const sorted = [...specs].sort((a, b) => a.gpa - b.gpa);
  for (let i = 1; i < sorted.length; i++) {
    if (sorted[i - 1].gpa + sorted[i - 1].size > sorted[i].gpa) {
      throw new RangeError(`regions at gpa ${sorted[i - 1].gpa} and ${sorted[i].gpa} overlap`);
    }
  }
}
