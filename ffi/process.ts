/**
 * Process accounting: CPU time (getrusage) and resident memory, for the
 * benchmark's CPU-seconds-per-GiB and RSS figures.
 */
import { sys } from "./libc.ts";
import { check } from "./errno.ts";

export const RUSAGE_SELF = 0;
export const RUSAGE_CHILDREN = -1;
export const RUSAGE_THREAD = 1;

/** user + system CPU seconds of `who` (RUSAGE_SELF, RUSAGE_THREAD, RUSAGE_CHILDREN). */
export function cpuSeconds(who = RUSAGE_SELF): number {
  const ru = new BigInt64Array(18);
  check("getrusage", sys.getrusage(who, new Uint8Array(ru.buffer)));
  // struct rusage starts with ru_utime, ru_stime (struct timeval: sec, usec)
  return Number(ru[0]) + Number(ru[1]) / 1e6 + Number(ru[2]) + Number(ru[3]) / 1e6;
}

/** Resident set size in bytes of process `pid` (default: this process). */
export function rssBytes(pid: number | "self" = "self"): number {
  const text = Deno.readTextFileSync(`/proc/${pid}/statm`);
  const pages = Number(text.split(" ")[1]);
  return pages * 4096;
}
