/**
 * Summarises a V8 CPU profile (`deno run --cpu-prof ...` writes one per thread; under
 * `profile_backend.ts` the back end's reactor is the main thread's `CPU.<time>.<pid>.cpuprofile`):
 * self time per function, and time per category.
 *
 * Usage: deno run -A tests/bench/profile_summary.ts FILE.cpuprofile [--top 30]
 *
 * V8 charges the time spent inside a synchronous FFI call to the JS function that made it, so
 * the thin wrappers in `ffi/` (readvRaw, writevRaw, eventFdWrite, Epoll.wait, ...) stand for
 * their system calls. The profiler samples wall-clock time: a call during which the thread
 * lost its CPU (a peer it woke preempted it) is charged its whole duration; `perf` in
 * `profile_attach.ts cpu` gives on-CPU time. Categories:
 * - "epoll_wait (blocked)": `Epoll.wait`, the reactor sleeping;
 * - "syscalls (ffi/)": every other function defined in `ffi/`;
 * - "JS (lib/)": the back end's own code;
 * - "GC", "idle/program", and "runtime" (everything else: Deno internals, ops).
 */
import { parseArgs } from "node:util";

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
}
interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}
interface Profile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
  startTime: number;
  endTime: number;
}

/** Self time per function and per category, in microseconds. */
export interface Summary {
  totalUs: number;
  functions: { name: string; where: string; us: number }[];
  categories: Record<string, number>;
}

function category(f: CallFrame): string {
  const name = f.functionName;
  if (name === "(garbage collector)") return "GC";
  if (name === "(idle)" || name === "(program)" || name === "(root)") return "idle/program";
  if (/\/ffi\/events\.ts$/.test(f.url) && name === "wait") return "epoll_wait (blocked)";
  if (/\/ffi\//.test(f.url)) return "syscalls (ffi/)";
  if (/\/lib\//.test(f.url)) return "JS (lib/)";
  return "runtime";
}

/** Computes the summary of a parsed profile. */
export function summarize(p: Profile): Summary {
  const byId = new Map<number, ProfileNode>();
  for (const n of p.nodes) byId.set(n.id, n);
  const self = new Map<number, number>();
  for (let i = 0; i < p.samples.length; i++) {
    // timeDeltas[i] is the time since the previous sample: charge it to sample i.
    self.set(p.samples[i], (self.get(p.samples[i]) ?? 0) + Math.max(0, p.timeDeltas[i]));
  }
  const fn = new Map<string, { name: string; where: string; us: number }>();
  const categories: Record<string, number> = {};
  let totalUs = 0;
  for (const [id, us] of self) {
    const f = byId.get(id)!.callFrame;
    const where = f.url === "" ? "" : `${f.url.split("/").slice(-2).join("/")}:${f.lineNumber + 1}`;
    const key = `${f.functionName}@${where}`;
    const e = fn.get(key) ?? { name: f.functionName || "(anonymous)", where, us: 0 };
    e.us += us;
    fn.set(key, e);
    const c = category(f);
    categories[c] = (categories[c] ?? 0) + us;
    totalUs += us;
  }
  const functions = [...fn.values()].sort((a, b) => b.us - a.us);
  return { totalUs, functions, categories };
}

if (import.meta.main) {
  const { values, positionals } = parseArgs({
    args: Deno.args,
    allowPositionals: true,
    options: { top: { type: "string", default: "30" } },
  });
  for (const file of positionals) {
    const s = summarize(JSON.parse(Deno.readTextFileSync(file)) as Profile);
    const busy = s.totalUs - (s.categories["epoll_wait (blocked)"] ?? 0) -
      (s.categories["idle/program"] ?? 0);
    console.log(
      `${file}: ${(s.totalUs / 1e3).toFixed(0)} ms sampled, ` +
        `${(busy / 1e3).toFixed(0)} ms busy (not blocked in epoll_wait or idle)`,
    );
    console.log("categories (share of busy time):");
    for (const [c, us] of Object.entries(s.categories).sort((a, b) => b[1] - a[1])) {
      const share = c === "epoll_wait (blocked)" || c === "idle/program"
        ? "-"
        : `${((100 * us) / busy).toFixed(1)}%`;
      console.log(`  ${c.padEnd(22)} ${(us / 1e3).toFixed(1).padStart(9)} ms  ${share}`);
    }
    console.log(`top ${values.top} functions by self time (share of busy time):`);
    for (const f of s.functions.slice(0, Number(values.top))) {
      console.log(
        `  ${(f.us / 1e3).toFixed(1).padStart(9)} ms ${
          ((100 * f.us) / busy).toFixed(1).padStart(5)
        }%` +
          `  ${f.name}  ${f.where}`,
      );
    }
    console.log("");
  }
}
