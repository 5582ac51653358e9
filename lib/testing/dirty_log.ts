/**
 * The dirty-page log a front end hands to the back end with SET_LOG_BASE
 * (`docs/interop/vhost-user.rst`, "Migration"): a shared memfd with one bit per
 * `VHOST_LOG_PAGE` (4 KiB) page of guest-physical memory, bit `n % 8` of byte `n / 8` for
 * page n, which the back end sets for every page it writes while VHOST_F_LOG_ALL is acked.
 */

import { close, type Mapping, mapShared, memfdCreate, unmap } from "../../ffi/mod.ts";
import { VHOST_LOG_PAGE } from "../vhost_user/protocol.ts";

/** A dirty-page log handed to the back end with SET_LOG_BASE (one bit per 4 KiB page). */
export interface DirtyLog {
  /** the log bytes, live (bit `n % 8` of byte `n / 8` = page n) */
  readonly bytes: Uint8Array;
  /** whether the page holding guest-physical `gpa` is marked dirty */
  isDirty(gpa: number): boolean;
  /** whether every page of [gpa, gpa+len) is marked dirty */
  isRangeDirty(gpa: number, len: number): boolean;
  /** guest-physical addresses of the dirty pages, ascending */
  dirtyPages(): number[];
  /** clears every bit */
  clear(): void;
  /** unmaps the log and closes its memfd */
  close(): void;
}

/** A log of `size` bytes and the memfd to send with SET_LOG_BASE (mmap offset 0). */
export interface DirtyLogArea {
  readonly fd: number;
  readonly size: number;
  readonly log: DirtyLog;
}

/**
 * Creates a log for guest RAM up to `topGpa`: `size` bytes, by default one bit per page
 * rounded up to whole u64s like QEMU's log chunks, in a page-rounded memfd.
 */
export function createDirtyLog(topGpa: number, size?: number): DirtyLogArea {
  const pages = Math.ceil(topGpa / VHOST_LOG_PAGE);
  const logSize = size ?? Math.max(8, Math.ceil(pages / 64) * 8);
  const mapSize = Math.ceil(logSize / 4096) * 4096;
  const fd = memfdCreate("dirty-log", mapSize);
  let m: Mapping;
  try {
    m = mapShared(fd, mapSize, 0);
  } catch (e) {
    close(fd);
    throw e;
  }
  return { fd, size: logSize, log: makeDirtyLog(m, fd, logSize) };
}

function makeDirtyLog(m: Mapping, fd: number, size: number): DirtyLog {
  const bytes = m.bytes.subarray(0, size);
  let closed = false;
  const isDirty = (gpa: number) => {
    const page = Math.floor(gpa / VHOST_LOG_PAGE);
    const byte = page >> 3;
    return byte < bytes.length && (bytes[byte] & (1 << (page & 7))) !== 0;
  };
  return {
    bytes,
    isDirty,
    isRangeDirty(gpa: number, len: number): boolean {
      for (let p = Math.floor(gpa / VHOST_LOG_PAGE); p * VHOST_LOG_PAGE < gpa + len; p++) {
        if (!isDirty(p * VHOST_LOG_PAGE)) return false;
      }
      return true;
    },
    dirtyPages(): number[] {
      const out: number[] = [];
      for (let i = 0; i < bytes.length; i++) {
        if (bytes[i] === 0) continue;
        for (let b = 0; b < 8; b++) if (bytes[i] & (1 << b)) out.push((i * 8 + b) * VHOST_LOG_PAGE);
      }
      return out;
    },
    clear(): void {
      bytes.fill(0);
    },
    close(): void {
      if (closed) return;
      closed = true;
      unmap(m);
      close(fd);
    },
  };
}
