/**
 * Reading `perf script` output for the profile of the back end (`profile_attach.ts`): samples
 * with their call chains, and where an on-CPU sample's time goes.
 *
 * A sample is one block of `perf script -F pid,tid,comm,period,ip,sym,dso` (or with `trace`
 * for sched_switch events): a header line, then one frame per line, leaf first. Categories
 * of an on-CPU sample, from its leaf frame:
 * - "copy": a kernel copy routine (socket data to or from user memory) or libc memcpy/memmove
 *   (user-space copies: a TypedArray `set`/`copyWithin` lands there);
 * - "JS": JIT code (named when the process ran with DENO_V8_FLAGS=--perf-basic-prof);
 * - "V8/FFI": the deno binary itself: V8 runtime and builtins, GC, FFI trampolines, ops;
 * - "wake-up/scheduling": kernel wake-ups of another task (eventfd, socket readiness) and the
 *   scheduler (context switches);
 * - "syscall/socket": every other kernel path (entry and exit, fd lookup, socket locking and
 *   skb allocation, epoll/poll bookkeeping) and the libc syscall wrappers.
 * On a paravirtualized guest kernel many samples land in `pvm_irq_enable` (time spent with
 * interrupts off is charged where they are re-enabled), so kernel samples are classified by
 * the first meaningful frame up their chain, not by the leaf.
 */

export interface Frame {
  sym: string;
  dso: string;
}

export interface Sample {
  pid: number;
  comm: string;
  /** the header after pid/tid (the tracepoint's text for sched_switch samples) */
  text: string;
  /** leaf first */
  frames: Frame[];
}

/** Splits `perf script` output into samples. */
export function parseSamples(out: string): Sample[] {
  const samples: Sample[] = [];
  for (const block of out.split("\n\n")) {
    const lines = block.split("\n").filter((l) => l.trim() !== "");
    if (lines.length === 0) continue;
    const m = /^\s*(.*?)\s+(\d+)\/(\d+)\s*(.*)$/.exec(lines[0]);
    if (m === null) continue;
    const frames: Frame[] = [];
    for (const l of lines.slice(1)) {
      const f = /^\s*[0-9a-f]+ (.*) \((.*)\)$/.exec(l);
      if (f !== null) frames.push({ sym: f[1], dso: f[2] });
    }
    samples.push({ pid: Number(m[2]), comm: m[1], text: m[4], frames });
  }
  return samples;
}

export const CATEGORIES = ["copy", "JS", "V8/FFI", "syscall/socket", "wake-up/scheduling"] as const;
export type Category = typeof CATEGORIES[number];

const KERNEL_COPY =
  /copy_user|rep_movs|copy_to_user|copy_from_user|_copy_to_iter|_copy_from_iter|copy_page_to_iter|copy_page_from_iter|^memcpy|^memmove|skb_copy_datagram|simple_copy_to_iter/;
const KERNEL_WAKE =
  /try_to_wake_up|__wake_up|wake_up_|sock_def_readable|sock_def_write_space|ep_poll_callback|eventfd_write|eventfd_signal|ttwu|select_task_rq|^__schedule|^schedule|finish_task_switch|pick_next|dequeue_task|enqueue_task|context_switch|update_curr|__switch_to/;
const KERNEL_SKIP = /^pvm_|__raw_callee_save|_raw_spin|native_|queued_spin|^\[unknown\]/;

const isKernel = (f: Frame) => f.dso.includes("kernel");

/** Where an on-CPU sample's time goes. */
export function categorize(frames: Frame[]): Category {
  const leaf = frames[0];
  if (leaf === undefined) return "syscall/socket";
  if (isKernel(leaf)) {
    for (const f of frames) {
      if (!isKernel(f)) break;
      if (KERNEL_SKIP.test(f.sym)) continue;
      if (KERNEL_COPY.test(f.sym)) return "copy";
      if (KERNEL_WAKE.test(f.sym)) return "wake-up/scheduling";
    }
    return "syscall/socket";
  }
  if (/libc/.test(leaf.dso)) return /mem(move|cpy)/.test(leaf.sym) ? "copy" : "syscall/socket";
  if (leaf.sym.startsWith("JS:") || /perf-\d+\.map/.test(leaf.dso)) return "JS";
  return "V8/FFI";
}

/** The innermost JavaScript function of a chain ("name file.ts"), or "-". */
export function innermostJs(frames: Frame[]): string {
  for (const f of frames) {
    if (!f.sym.startsWith("JS:")) continue;
    const m = /^JS:\S*?'?([#\w$]*)\s*\S*\/([^/\s]+\.ts):\d+/.exec(f.sym);
    return m === null ? f.sym.slice(0, 60) : `${m[1] || "(anonymous)"} ${m[2]}`;
  }
  return "-";
}

/** The libc function of the user-space frames (the system call a switch happened in), or "-". */
export function userCall(frames: Frame[]): string {
  for (const f of frames) if (!isKernel(f)) return f.sym.replace(/^__GI___(libc_)?/, "");
  return "-";
}
