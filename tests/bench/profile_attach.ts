/**
 * Profile of a running benchmark stream from outside: attaches Linux `perf` to the three
 * processes that move the data (the back end's process tree, the guest driver, the host app)
 * for a few seconds in the middle of a stream, and reports per process where the time goes.
 *
 * Usage: start a bench stream (one direction, long enough), then while it runs:
 *   deno run -A tests/bench/profile_attach.ts counts|cpu|switches [--seconds 2] [--bench PID]
 *     [--packet BYTES]
 * - counts: CPU and run-queue wait per second, system calls by kind, context switches
 *   (`perf stat` on syscall tracepoints: cheap, unlike strace, whose ptrace stops slow the back
 *   end down several-fold and change its batching);
 * - cpu: on-CPU samples with call chains (`perf record -g`) in the categories of
 *   `perf_samples.ts` (copy, JS, V8/FFI, syscall/socket, wake-up/scheduling), the top JS
 *   functions and who calls memcpy (JS names need DENO_V8_FLAGS=--perf-basic-prof in the
 *   bench's environment, which every Deno process it starts inherits);
 * - switches: every context switch (`sched:sched_switch`): asleep or preempted, in which call.
 * Counts are per MiB the host app moved (its /proc/<pid>/io, a steady-state rate over the
 * window) and, with --packet, per guest packet of that many payload bytes.
 *
 * Which processes: the newest `tests/bench/bench.ts` (or --bench); its first host app (the
 * one facing the back ends); of the guests and back ends, the one that used most CPU in a
 * short sample (only one streams at a time). Needs root or perf_event_paranoid <= 1.
 */
import { parseArgs } from "node:util";
import { CATEGORIES, categorize, innermostJs, parseSamples, userCall } from "./perf_samples.ts";
import { procCpuSeconds, procSchedSeconds, procTree } from "./proc_stats.ts";

const MiB = 1024 * 1024;

interface Role {
  name: "back end" | "guest" | "host app";
  root: number;
  pids: number[];
}

const cmdline = (pid: number) => {
  try {
    return Deno.readTextFileSync(`/proc/${pid}/cmdline`).replaceAll("\0", " ");
  } catch {
    return "";
  }
};

function findBench(): number {
  const benches = [...Deno.readDirSync("/proc")].map((e) => Number(e.name))
    .filter((p) => p > 0 && /deno\S* run .*tests\/bench\/bench\.ts/.test(cmdline(p)));
  if (benches.length === 0) throw new Error("no running tests/bench/bench.ts (use --bench PID)");
  return Math.max(...benches);
}

/** Direct children of `pid` (of all its threads). */
function children(pid: number): number[] {
  return [...Deno.readDirSync(`/proc/${pid}/task`)].flatMap((t) => {
    const c = Deno.readTextFileSync(`/proc/${pid}/task/${t.name}/children`).trim();
    return c === "" ? [] : c.split(" ").map(Number);
  });
}

/** The busiest of `roots` (process trees) over `ms`. */
async function busiest(roots: number[], ms: number): Promise<number> {
  const cpu = (r: number) => procTree(r).reduce((s, p) => s + (procCpuSeconds(p) || 0), 0);
  const before = roots.map(cpu);
  await new Promise((resolve) => setTimeout(resolve, ms));
  const used = roots.map((r, i) => cpu(r) - before[i]);
  return roots[used.indexOf(Math.max(...used))];
}

async function findRoles(bench: number): Promise<Role[]> {
  const direct = children(bench);
  const hosts = direct.filter((p) => cmdline(p).includes("host_app_proc")).sort((a, b) => a - b);
  const guests = direct.filter((p) => cmdline(p).includes("guest_driver_proc"));
  const backs = direct.filter((p) => !hosts.includes(p) && !guests.includes(p));
  if (hosts.length === 0 || guests.length === 0 || backs.length === 0) {
    throw new Error(`bench ${bench}: host apps ${hosts}, guests ${guests}, back ends ${backs}`);
  }
  const role = (name: Role["name"], root: number): Role => ({ name, root, pids: procTree(root) });
  return [
    role("back end", await busiest(backs, 300)),
    role("guest", await busiest(guests, 300)),
    role("host app", hosts[0]),
  ];
}

function hostBytes(pid: number): number {
  const io = Deno.readTextFileSync(`/proc/${pid}/io`);
  const field = (k: string) => Number(new RegExp(`^${k}: (\\d+)`, "m").exec(io)![1]);
  return Math.max(field("rchar"), field("wchar")); // it only reads or only writes
}

/** Runs perf; returns what it wrote to `-o` (stat) or stdout (script). */
function perf(args: string[], output?: string): string {
  const out = new Deno.Command("perf", { args, stdout: "piped", stderr: "piped" }).outputSync();
  if (!out.success) throw new Error(`perf ${args[0]}: ${new TextDecoder().decode(out.stderr)}`);
  return output !== undefined
    ? Deno.readTextFileSync(output)
    : new TextDecoder().decode(out.stdout);
}

/** A temporary file for the duration of `use`. */
function withTemp<T>(use: (file: string) => T): T {
  const file = Deno.makeTempFileSync({ prefix: "profile_attach" });
  try {
    return use(file);
  } finally {
    Deno.removeSync(file);
  }
}

/** Runs `measure` over the window; returns MiB moved by the host app and the window's seconds. */
function window<T>(roles: Role[], measure: () => T): { mib: number; seconds: number; r: T } {
  const host = roles.find((r) => r.name === "host app")!.root;
  const b0 = hostBytes(host);
  const t0 = performance.now();
  const r = measure();
  const seconds = (performance.now() - t0) / 1000;
  return { mib: (hostBytes(host) - b0) / MiB, seconds, r };
}

const EVENTS: [string, string][] = [
  ["task-clock", ""],
  ["context-switches", ""],
  ["raw_syscalls:sys_enter", "syscalls"],
  ["syscalls:sys_enter_write", "count == 8"], // eventfd writes: kicks, interrupts
  ["syscalls:sys_enter_write", "count != 8"],
  ["syscalls:sys_enter_read", "count == 8"], // eventfd reads
  ["syscalls:sys_enter_read", "count != 8"],
  ["syscalls:sys_enter_readv", ""],
  ["syscalls:sys_enter_writev", ""],
  ["syscalls:sys_enter_epoll_wait", ""],
  ["syscalls:sys_enter_poll", ""],
];
/** eventfd reads and writes are told from data by their 8-byte count */
const COLUMNS = [
  "syscalls",
  "efd write",
  "write",
  "efd read",
  "read",
  "readv",
  "writev",
  "epoll",
  "poll",
  "switches",
];

function counts(roles: Role[], seconds: number, packet: number): void {
  const tidRole = new Map<string, Role>();
  for (const r of roles) {
    for (const p of r.pids) {
      for (const t of Deno.readDirSync(`/proc/${p}/task`)) tidRole.set(t.name, r);
    }
  }
  const args = ["stat", "-x,", "--per-thread"];
  for (const [e, filter] of EVENTS) {
    args.push("-e", e);
    if (filter.includes("count")) args.push("--filter", filter);
  }
  const all = roles.flatMap((r) => r.pids).join(",");
  const sched0 = roles.map((r) => procSchedSeconds(r.root));
  const w = window(
    roles,
    () => withTemp((f) => perf([...args, "-p", all, "-o", f, "sleep", `${seconds}`], f)),
  );
  const sched1 = roles.map((r) => procSchedSeconds(r.root));
  // One line per thread and event, events in the order given: a filtered event repeats.
  const acc = new Map<Role, number[]>(roles.map((r) => [r, new Array(EVENTS.length).fill(0)]));
  const seen = new Map<string, number>();
  for (const line of w.r.split("\n")) {
    const f = line.split(",");
    if (f.length < 4 || f[1].startsWith("<")) continue;
    const tid = f[0].slice(f[0].lastIndexOf("-") + 1);
    const key = `${tid} ${f[3]}`;
    const nth = seen.get(key) ?? 0;
    seen.set(key, nth + 1);
    const i = EVENTS.findIndex(([e], j) =>
      e === f[3] && EVENTS.slice(0, j).filter(([x]) => x === e).length === nth
    );
    const r = tidRole.get(tid);
    if (i >= 0 && r !== undefined) acc.get(r)![i] += Number(f[1]);
  }
  const perMiB = w.mib / w.seconds * seconds; // MiB during perf's own window (steady state)
  const unit = packet > 0 ? `per packet of ${packet} B` : "per MiB";
  const per = (n: number) => packet > 0 ? n / (perMiB * MiB / packet) : n / perMiB;
  console.log(
    `${w.seconds.toFixed(2)} s, host app moved ${(w.mib / w.seconds).toFixed(0)} MiB/s; ` +
      `counts ${unit}:`,
  );
  console.log(["".padEnd(9), "CPU/s", "wait/s", ...COLUMNS].map((c) => c.padStart(9)).join(" "));
  roles.forEach((r, k) => {
    const a = acc.get(r)!;
    const cells = [
      (a[0] / 1000 / seconds).toFixed(2),
      ((sched1[k].waiting - sched0[k].waiting) / w.seconds).toFixed(2),
      ...[2, 3, 4, 5, 6, 7, 8, 9, 10, 1].map((i) => per(a[i]).toFixed(packet > 0 ? 3 : 1)),
    ];
    console.log([r.name.padEnd(9), ...cells.map((c) => c.padStart(9))].join(" "));
  });
}

/** Records on-CPU samples (or `extra` events) of the roles' processes over the window. */
function record(roles: Role[], seconds: number, extra: string[]) {
  const all = roles.flatMap((r) => r.pids).join(",");
  const fields = extra.includes("-e") ? "pid,tid,comm,trace,ip,sym,dso" : "pid,tid,comm,ip,sym,dso";
  return withTemp((file) => {
    const w = window(roles, () => {
      perf(["record", "-g", ...extra, "-o", file, "-p", all, "--", "sleep", `${seconds}`]);
    });
    console.log(
      `${w.seconds.toFixed(2)} s, host app moved ${(w.mib / w.seconds).toFixed(0)} MiB/s`,
    );
    return { mib: w.mib, samples: parseSamples(perf(["script", "-i", file, "-F", fields])) };
  });
}

const share = (n: number, total: number) => `${((100 * n) / total).toFixed(1)}%`;
const top = (m: Map<string, number>, total: number, n = 6) =>
  [...m].sort((a, b) => b[1] - a[1]).slice(0, n).map(([k, v]) => `${k} ${share(v, total)}`)
    .join(", ");
const bump = (m: Map<string, number>, k: string) => m.set(k, (m.get(k) ?? 0) + 1);

function cpu(roles: Role[], seconds: number): void {
  const { samples } = record(roles, seconds, ["-F", "999"]);
  for (const r of roles) {
    const mine = samples.filter((s) => r.pids.includes(s.pid));
    const cats = new Map<string, number>();
    const js = new Map<string, number>();
    const copies = new Map<string, number>();
    const threads = new Map<string, number>();
    for (const s of mine) {
      const c = categorize(s.frames);
      bump(cats, c);
      bump(threads, s.comm);
      if (c === "JS") bump(js, innermostJs(s.frames));
      if (c === "copy" && /libc/.test(s.frames[0].dso)) bump(copies, innermostJs(s.frames));
    }
    console.log(`${r.name}: ${mine.length} samples (${top(threads, mine.length, 3)})`);
    console.log(
      `  ${CATEGORIES.map((c) => `${c} ${share(cats.get(c) ?? 0, mine.length)}`).join(", ")}`,
    );
    if (js.size > 0) console.log(`  top JS: ${top(js, mine.length)}`);
    if (copies.size > 0) console.log(`  memcpy in user space, from: ${top(copies, mine.length)}`);
  }
}

function switches(roles: Role[], seconds: number): void {
  const { samples, mib } = record(roles, seconds, ["-e", "sched:sched_switch"]);
  for (const r of roles) {
    const mine = samples.filter((s) => r.pids.includes(s.pid));
    const kinds = new Map<string, number>();
    for (const s of mine) {
      const preempted = /prev_state=R/.test(s.text);
      bump(kinds, `${preempted ? "preempted" : "sleeps"} in ${userCall(s.frames)}`);
    }
    const perMiB = (mine.length / mib).toFixed(1);
    console.log(`${r.name}: ${perMiB} switches per MiB: ${top(kinds, mine.length, 5)}`);
  }
}

if (import.meta.main) {
  const { values, positionals } = parseArgs({
    args: Deno.args,
    allowPositionals: true,
    options: {
      seconds: { type: "string", default: "2" },
      bench: { type: "string" },
      packet: { type: "string", default: "0" },
    },
  });
  const mode = positionals[0];
  const roles = await findRoles(values.bench !== undefined ? Number(values.bench) : findBench());
  console.log(roles.map((r) => `${r.name} ${r.pids.join("+")}`).join(", "));
  const seconds = Number(values.seconds);
  if (mode === "counts") counts(roles, seconds, Number(values.packet));
  else if (mode === "cpu") cpu(roles, seconds);
  else if (mode === "switches") switches(roles, seconds);
  else throw new Error("mode: counts | cpu | switches");
}
