/**
 * Accounting of other processes for the benchmark, from procfs: CPU seconds
 * (`/proc/<pid>/stat` utime + stime, all threads, in clock ticks) and resident memory
 * (`/proc/<pid>/status` VmRSS), each summed over the process and its descendants
 * (`/proc/<pid>/task/<tid>/children`): our back end serves each VM from a worker process its
 * supervisor spawns (`--workers`), so the supervisor alone would miss the data path. A child's
 * own CPU time is reported by the child (getrusage via `ffi/process.ts`).
 */

/** Clock ticks per second of /proc/<pid>/stat (USER_HZ; 100 on Linux x86_64). */
export const CLOCK_TICKS = 100;

/** `pid` and every live descendant of it (children of all its threads, recursively). */
export function procTree(pid: number): number[] {
  const out = [pid];
  for (let i = 0; i < out.length; i++) {
    try {
      for (const e of Deno.readDirSync(`/proc/${out[i]}/task`)) {
        try {
          const c = Deno.readTextFileSync(`/proc/${out[i]}/task/${e.name}/children`).trim();
          if (c !== "") out.push(...c.split(" ").map(Number));
        } catch { /* thread ended */ }
      }
    } catch { /* process gone */ }
  }
  return out;
}

/** user + system CPU seconds of one process (all its threads); NaN if it is gone. */
function ownCpuSeconds(pid: number): number {
  let text: string;
  try {
    text = Deno.readTextFileSync(`/proc/${pid}/stat`);
  } catch {
    return NaN;
  }
  // The command name (field 2) is in parentheses and may contain spaces.
  const rest = text.slice(text.lastIndexOf(")") + 2).split(" ");
  // rest[0] is field 3 (state); utime is field 14, stime field 15.
  return (Number(rest[11]) + Number(rest[12])) / CLOCK_TICKS;
}

/**
 * user + system CPU seconds of process `pid` and its live descendants; NaN if `pid` is gone.
 * (A descendant that exits between two samples takes its seconds with it.)
 */
export function procCpuSeconds(pid: number): number {
  return sumOverTree(pid, ownCpuSeconds);
}

/** `own(p)` summed over `pid` and its live descendants; NaN if `pid` itself is gone. */
function sumOverTree(pid: number, own: (p: number) => number): number {
  let sum = 0;
  for (const p of procTree(pid)) {
    const s = own(p);
    if (p === pid && Number.isNaN(s)) return NaN;
    if (Number.isFinite(s)) sum += s;
  }
  return sum;
}

/** Resident set size of one process in bytes (VmRSS); NaN if it is gone. */
function ownRssBytes(pid: number): number {
  let text: string;
  try {
    text = Deno.readTextFileSync(`/proc/${pid}/status`);
  } catch {
    return NaN;
  }
  const m = /^VmRSS:\s+(\d+) kB/m.exec(text);
  return m === null ? NaN : Number(m[1]) * 1024;
}

/**
 * Resident set size of process `pid` and its live descendants, summed (pages they share are
 * counted once per process), in bytes; NaN if `pid` is gone.
 */
export function procRssBytes(pid: number): number {
  return sumOverTree(pid, ownRssBytes);
}

/** Threads of process `pid` and its descendants with names and CPU seconds (for the report). */
export function procThreads(root: number): { tid: number; name: string; cpu: number }[] {
  const out: { tid: number; name: string; cpu: number }[] = [];
  for (const pid of procTree(root)) {
    try {
      for (const e of Deno.readDirSync(`/proc/${pid}/task`)) {
        const tid = Number(e.name);
        try {
          const name = Deno.readTextFileSync(`/proc/${pid}/task/${tid}/comm`).trim();
          const text = Deno.readTextFileSync(`/proc/${pid}/task/${tid}/stat`);
          const rest = text.slice(text.lastIndexOf(")") + 2).split(" ");
          out.push({ tid, name, cpu: (Number(rest[11]) + Number(rest[12])) / CLOCK_TICKS });
        } catch { /* thread ended */ }
      }
    } catch { /* process gone */ }
  }
  return out;
}

/** Aggregate CPU times of the machine (/proc/stat "cpu" line), in clock ticks. */
export interface MachineCpu {
  readonly total: number;
  readonly idle: number;
  readonly steal: number;
}

/** Reads the machine's aggregate CPU counters. */
export function machineCpu(): MachineCpu {
  const line = Deno.readTextFileSync("/proc/stat").split("\n")[0];
  // cpu user nice system idle iowait irq softirq steal guest guest_nice
  const f = line.trim().split(/\s+/).slice(1).map(Number);
  const total = f.slice(0, 8).reduce((a, b) => a + b, 0);
  return { total, idle: f[3] + f[4], steal: f[7] ?? 0 };
}

/** Share of CPU time that was stolen (hypervisor) and that was busy, between two readings. */
export function machineLoad(a: MachineCpu, b: MachineCpu): { steal: number; busy: number } {
  const total = b.total - a.total;
  if (total <= 0) return { steal: NaN, busy: NaN };
  return {
    steal: (b.steal - a.steal) / total,
    busy: 1 - (b.idle - a.idle) / total,
  };
}

/**
 * Scheduler statistics of process `root` and its descendants, summed over their threads
 * (/proc/<pid>/task/<tid>/schedstat): seconds on a CPU and seconds runnable but waiting for one (run delay: CPU starvation, not
 * sleep). NaN when unavailable.
 */
export function procSchedSeconds(root: number): { onCpu: number; waiting: number } {
  let onCpu = 0;
  let waiting = 0;
  for (const pid of procTree(root)) {
    try {
      for (const e of Deno.readDirSync(`/proc/${pid}/task`)) {
        try {
          const f = Deno.readTextFileSync(`/proc/${pid}/task/${e.name}/schedstat`).trim()
            .split(" ");
          onCpu += Number(f[0]) / 1e9;
          waiting += Number(f[1]) / 1e9;
        } catch { /* thread ended */ }
      }
    } catch {
      if (pid === root) return { onCpu: NaN, waiting: NaN };
    }
  }
  return { onCpu, waiting };
}
