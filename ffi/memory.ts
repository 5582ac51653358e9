/**
 * Shared memory: memfd_create, ftruncate, mmap/munmap.
 *
 * Guest RAM arrives as memfds from the front end (SET_MEM_TABLE, ADD_MEM_REG);
 * the backend maps each one MAP_SHARED once and builds one typed-array view per
 * region. The testing library creates guest RAM the same way.
 */
import { sys } from "./libc.ts";
import { check, errno, SysError } from "./errno.ts";

export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 1;
export const MAP_PRIVATE = 2;
export const MAP_ANONYMOUS = 0x20;
export const MFD_CLOEXEC = 1;

/** A live mapping. `bytes` must not be used after `unmap()`. */
export interface Mapping {
  readonly ptr: Deno.PointerObject;
  /** process address of byte 0 (fits a JS number on x86_64: < 2^47) */
  readonly addr: number;
  readonly size: number;
  readonly bytes: Uint8Array;
}

/** memfd_create(name, MFD_CLOEXEC) sized to `size` bytes. */
export function memfdCreate(name: string, size: number): number {
  const fd = check(
    "memfd_create",
    sys.memfd_create(new TextEncoder().encode(name + "\0"), MFD_CLOEXEC),
  );
  if (sys.ftruncate(fd, BigInt(size)) !== 0) {
    const e = errno();
    sys.close(fd);
    throw new SysError("ftruncate", e, `${size} bytes`);
  }
  return fd;
}

/** mmap(NULL, size, READ|WRITE, MAP_SHARED, fd, offset). */
export function mapShared(fd: number, size: number, offset = 0): Mapping {
  if (!Number.isSafeInteger(size) || size <= 0) throw new Error(`bad mapping size ${size}`);
  const ptr = sys.mmap(null, BigInt(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, BigInt(offset));
  const addr = Number(Deno.UnsafePointer.value(ptr));
  if (ptr === null || addr === -1 || addr >= 2 ** 64 - 4096) {
    throw new SysError("mmap", errno(), `fd ${fd} size ${size} offset ${offset}`);
  }
  const bytes = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ptr, size));
  return { ptr, addr, size, bytes };
}

const SEEK_END = 2;

/**
 * The size of the file behind `fd` (lseek SEEK_END), or -1 when it has none (a pipe, a
 * socket). Mapping past it "succeeds" but the first access raises SIGBUS.
 */
export function fdSize(fd: number): number {
  const n = sys.lseek(fd, 0n, SEEK_END);
  return n < 0n ? -1 : Number(n);
}

/** munmap(2). */
export function unmap(m: Mapping): void {
  sys.munmap(m.ptr, BigInt(m.size));
}
