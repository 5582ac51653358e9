/**
 * errno: reading it right after a failed call, naming it, and the one error type
 * (`SysError`) that every throwing wrapper in `ffi/` uses.
 *
 * errno is thread-local; `__errno_location()` is resolved once per JS thread
 * (each Worker loads its own copy of this module on its own OS thread).
 */
import { sys } from "./libc.ts";

const errnoView = new Deno.UnsafePointerView(sys.__errno_location()!);

/** The calling thread's errno. Read it immediately after the failing call. */
export function errno(): number {
  return errnoView.getInt32();
}

export const EPERM = 1;
export const ENOENT = 2;
export const EINTR = 4;
export const EIO = 5;
export const EBADF = 9;
export const EAGAIN = 11;
export const ENOMEM = 12;
export const EACCES = 13;
export const EFAULT = 14;
export const EEXIST = 17;
export const EINVAL = 22;
export const EMFILE = 24;
export const ENOSPC = 28;
export const EPIPE = 32;
export const ERANGE = 34;
export const ENOTSOCK = 88;
export const EMSGSIZE = 90;
export const EOPNOTSUPP = 95;
export const EADDRINUSE = 98;
export const ENETUNREACH = 101;
export const ECONNABORTED = 103;
export const ECONNRESET = 104;
export const ENOTCONN = 107;
export const ETIMEDOUT = 110;
export const ECONNREFUSED = 111;
export const EINPROGRESS = 115;

const NAMES: Record<number, string> = {
  [EPERM]: "EPERM",
  [ENOENT]: "ENOENT",
  [EINTR]: "EINTR",
  [EIO]: "EIO",
  [EBADF]: "EBADF",
  [EAGAIN]: "EAGAIN",
  [ENOMEM]: "ENOMEM",
  [EACCES]: "EACCES",
  [EFAULT]: "EFAULT",
  [EEXIST]: "EEXIST",
  [EINVAL]: "EINVAL",
  [EMFILE]: "EMFILE",
  [ENOSPC]: "ENOSPC",
  [EPIPE]: "EPIPE",
  [ERANGE]: "ERANGE",
  [ENOTSOCK]: "ENOTSOCK",
  [EMSGSIZE]: "EMSGSIZE",
  [EOPNOTSUPP]: "EOPNOTSUPP",
  [EADDRINUSE]: "EADDRINUSE",
  [ENETUNREACH]: "ENETUNREACH",
  [ECONNABORTED]: "ECONNABORTED",
  [ECONNRESET]: "ECONNRESET",
  [ENOTCONN]: "ENOTCONN",
  [ETIMEDOUT]: "ETIMEDOUT",
  [ECONNREFUSED]: "ECONNREFUSED",
  [EINPROGRESS]: "EINPROGRESS",
};

/** "EAGAIN" for 11; "E<n>" for numbers without a name here. */
export function errnoName(n: number): string {
  return NAMES[n] ?? `E${n}`;
}

/** A failed system call: `code` is the errno name (EAGAIN, EPIPE, ...). */
export class SysError extends Error {
  readonly errno: number;
  readonly code: string;
  readonly syscall: string;
  constructor(syscall: string, err: number, detail?: string) {
    const p = sys.strerror(err);
    const text = p ? new Deno.UnsafePointerView(p).getCString() : "unknown error";
    super(`${syscall}${detail ? ` ${detail}` : ""}: ${errnoName(err)} (${text})`);
    this.name = "SysError";
    this.errno = err;
    this.code = errnoName(err);
    this.syscall = syscall;
  }
}

/** Throws a SysError for `syscall` when `ret` is negative (reading errno); else returns ret. */
export function check(syscall: string, ret: number, detail?: string): number {
  if (ret < 0) throw new SysError(syscall, errno(), detail);
  return ret;
}
