/**
 * The guest's RAM as the front end shares it: SET_MEM_TABLE / ADD_MEM_REG /
 * REM_MEM_REG regions, each an fd the back end maps MAP_SHARED once.
 *
 * A region description is `{guest_addr, size, user_addr, mmap_offset}`: the
 * fd is mapped from `mmap_offset` for `size` bytes; `guest_addr` is where the
 * bytes sit in guest-physical space (descriptor addresses); `user_addr` is where
 * the front end mapped them in its own address space (ring addresses in
 * SET_VRING_ADDR are front-end virtual addresses and translate through it).
 *
 * Dirty-page logging (live migration, VHOST_F_LOG_ALL): once SET_LOG_BASE has
 * handed over the log (one bit per 4 KiB guest page, `log[page / 8] |= 1 <<
 * page % 8`), every device write to guest memory sets the bits of the pages it
 * touched, while logging is switched on by the negotiated features.
 */
import { close, fdSize, type Mapping, mapShared, unmap } from "../../ffi/mod.ts";
import { findRegion, type GuestMemory, type MemRegion, rangeInside } from "../virtio/memory.ts";

/** Dirty log granularity of vhost: 4 KiB pages. */
export const VHOST_LOG_PAGE = 4096;

/** One mapped region. */
export interface MappedRegion extends MemRegion {
  readonly userAddr: number;
  readonly mmapOffset: number;
  readonly mapping: Mapping;
}

/** The region table of one front end. */
export class MappedGuestMemory implements GuestMemory {
  #regions: MappedRegion[] = [];
  #log: Mapping | null = null;
  #logging = false;

  get regions(): readonly MappedRegion[] {
    return this.#regions;
  }

  /** Maps `fd` (then closes it: the mapping keeps the memory) and adds the region. */
  add(desc: { guestAddr: number; size: number; userAddr: number; mmapOffset: number }, fd: number) {
    try {
      if (desc.size <= 0 || !Number.isSafeInteger(desc.guestAddr + desc.size)) {
        throw new Error(`invalid region size ${desc.size} at guest address ${desc.guestAddr}`);
      }
      for (const r of this.#regions) {
        if (desc.guestAddr < r.gpa + r.size && r.gpa < desc.guestAddr + desc.size) {
          throw new Error(
            `region at guest address 0x${desc.guestAddr.toString(16)} overlaps another`,
          );
        }
      }
      checkBacked(fd, desc.mmapOffset, desc.size, "memory region");
      const mapping = mapShared(fd, desc.size, desc.mmapOffset);
      this.#regions.push({
        gpa: desc.guestAddr,
        size: desc.size,
        userAddr: desc.userAddr,
        mmapOffset: desc.mmapOffset,
        bytes: mapping.bytes,
        view: new DataView(mapping.bytes.buffer),
        hostAddr: mapping.addr,
        mapping,
      });
      this.#regions.sort((a, b) => a.gpa - b.gpa);
    } finally {
      close(fd);
    }
  }

  /** Unmaps the region with this guest address and size; false if there is none. */
  remove(guestAddr: number, size: number): boolean {
    const i = this.#regions.findIndex((r) => r.gpa === guestAddr && r.size === size);
    if (i < 0) return false;
    unmap(this.#regions[i].mapping);
    this.#regions.splice(i, 1);
    return true;
  }

  /** Unmaps every region (and the dirty log). */
  clear(): void {
    for (const r of this.#regions) unmap(r.mapping);
    this.#regions = [];
    this.setLog(null);
  }

  regionOf(gpa: number, len: number): number {
    return findRegion(this.#regions, gpa, len);
  }

  /** Front-end virtual address -> guest-physical, if [va, va+len) lies in one region. */
  vaToGpa(va: number, len: number): number | null {
    for (const r of this.#regions) {
      if (rangeInside(r.userAddr, r.size, va, len)) return r.gpa + (va - r.userAddr);
    }
    return null;
  }

  /** Installs (or removes) the dirty log mapping from SET_LOG_BASE. */
  setLog(log: Mapping | null): void {
    if (this.#log !== null) unmap(this.#log);
    this.#log = log;
  }

  /** Turns logging on or off (VHOST_F_LOG_ALL in the acked features). */
  setLogging(on: boolean): void {
    this.#logging = on;
  }

  get logging(): boolean {
    return this.#logging && this.#log !== null;
  }

  markDirty(gpa: number, len: number): void {
    if (!this.#logging || this.#log === null || len <= 0) return;
    const log = this.#log.bytes;
    const first = Math.floor(gpa / VHOST_LOG_PAGE);
    const last = Math.floor((gpa + len - 1) / VHOST_LOG_PAGE);
    for (let page = first; page <= last; page++) {
      const byte = page >>> 3;
      if (byte >= log.length) return; // beyond the log the front end sized: nothing to mark
      log[byte] |= 1 << (page & 7);
    }
  }
}

/** Throws unless `fd` backs [offset, offset+size) (touching beyond its end is a SIGBUS). */
export function checkBacked(fd: number, offset: number, size: number, what: string): void {
  const have = fdSize(fd);
  if (have >= 0 && offset + size > have) {
    throw new Error(`${what}: the fd holds ${have} bytes, ${offset + size} needed`);
  }
}
