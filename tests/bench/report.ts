/**
 * The benchmark's report: one row per figure with the raw AF_UNIX baseline measured in the
 * same run, each back end's value with its ratio to the baseline, the first back end against
 * the second ("ours/ref") and the target, printed as an aligned text table or as Markdown,
 * followed by CPU seconds per GiB of every process and every stream run.
 */

import type { StreamRun } from "./runs.ts";

/** Whether a bigger or a smaller value is better. */
export type Better = "higher" | "lower";

/** What a figure should reach (evaluated for the first back end only). */
export interface Target {
  /** bound on value / raw baseline */
  readonly ratio?: number;
  /** bound on the value itself */
  readonly value?: number;
  /** bound on first back end / second back end (throughput: >=, latency: <=) */
  readonly vsSecond?: number;
}

/** One figure of the report. */
export interface Row {
  /** stable key for JSON consumers, e.g. "g2h_64k_throughput" */
  readonly key: string;
  readonly name: string;
  readonly unit: string;
  readonly better: Better;
  /** the raw AF_UNIX baseline (NaN when there is none) */
  readonly raw: number;
  /** one value per back end, in the order of the report's back ends (NaN: not measured) */
  readonly values: readonly number[];
  /** text shown instead of a value (e.g. "yes, 1000/1000") */
  readonly notes?: readonly (string | undefined)[];
  readonly target?: Target;
}

/** A number with 3-4 significant digits. */
export function fmt(x: number): string {
  if (!Number.isFinite(x)) return "-";
  const a = Math.abs(x);
  if (a >= 1000) return x.toFixed(0);
  if (a >= 100) return x.toFixed(1);
  if (a >= 10) return x.toFixed(2);
  return x.toFixed(3);
}

/** The median of the finite values of `xs` (NaN when there are none). */
export function median(xs: readonly number[]): number {
  const s = xs.filter(Number.isFinite).sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function ratio(a: number, b: number): number {
  return Number.isFinite(a) && Number.isFinite(b) && b !== 0 ? a / b : NaN;
}

function cmp(better: Better, v: number, bound: number): boolean {
  return Number.isFinite(v) && (better === "higher" ? v >= bound : v <= bound);
}

/** The target text of `r`: "ratio >= 0.6: met; >= 1.5x second: MISSED". */
export function targetText(r: Row): string {
  const t = r.target;
  if (t === undefined) return "";
  const op = r.better === "higher" ? ">=" : "<=";
  const parts: string[] = [];
  const v = r.values[0];
  const mark = (ok: boolean) => (ok ? "met" : "MISSED");
  if (t.ratio !== undefined) {
    parts.push(`${op} ${t.ratio}x raw: ${mark(cmp(r.better, ratio(v, r.raw), t.ratio))}`);
  }
  if (t.value !== undefined) {
    parts.push(`${op} ${t.value} ${r.unit}: ${mark(cmp(r.better, v, t.value))}`);
  }
  if (t.vsSecond !== undefined && r.values.length > 1) {
    parts.push(
      `${op} ${t.vsSecond}x 2nd: ${mark(cmp(r.better, ratio(v, r.values[1]), t.vsSecond))}`,
    );
  }
  return parts.join("; ");
}

/** The cells of `r`: figure, raw, each back end (ratio), first/second, target. */
function cells(r: Row, nBackends: number, withTargets: boolean): string[] {
  const out = [`${r.name} (${r.unit})`, fmt(r.raw)];
  for (let i = 0; i < nBackends; i++) {
    const v = r.values[i];
    const note = r.notes?.[i];
    const q = ratio(v, r.raw);
    out.push(note ?? (Number.isFinite(q) ? `${fmt(v)} (${q.toFixed(2)}x)` : fmt(v)));
  }
  if (nBackends > 1) {
    const q = ratio(r.values[0], r.values[1]);
    out.push(Number.isFinite(q) ? `${q.toFixed(2)}x` : "-");
  }
  if (withTargets) out.push(targetText(r));
  return out;
}

function header(backends: readonly string[], withTargets: boolean): string[] {
  const h = ["figure", "raw AF_UNIX", ...backends.map((b) => `${b} (ratio)`)];
  if (backends.length > 1) h.push(`${backends[0]}/${backends[1]}`);
  if (withTargets) h.push(`target (${backends[0]})`);
  return h;
}

/** Renders rows as an aligned text table. */
export function table(head: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (c: readonly string[]) =>
    c.map((x, i) => (i === 0 ? x.padEnd(widths[i]) : x.padStart(widths[i]))).join("  ")
      .trimEnd();
  return [line(head), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line)].join("\n");
}

/** Renders rows as a Markdown table. */
export function markdown(head: readonly string[], rows: readonly (readonly string[])[]): string {
  const line = (c: readonly string[]) => `| ${c.join(" | ")} |`;
  return [line(head), line(head.map((_, i) => (i === 0 ? "---" : "---:"))), ...rows.map(line)]
    .join("\n");
}

/** The figure table, as text or Markdown. */
export function figureTable(
  rows: readonly Row[],
  backends: readonly string[],
  opts: { markdown?: boolean; targets?: boolean } = {},
): string {
  const withTargets = opts.targets ?? true;
  const render = opts.markdown ? markdown : table;
  return render(
    header(backends, withTargets),
    rows.map((r) => cells(r, backends.length, withTargets)),
  );
}

/** Everything the bench prints. */
export interface Report {
  /** lines about the run: back ends, machine, load, settings */
  readonly header: readonly string[];
  readonly rows: readonly Row[];
  /** per stream case: name, raw pair s/GiB, then per back end: back end, guest, host, total */
  readonly cpuRows: readonly (readonly string[])[];
  /** back-end names */
  readonly names: readonly string[];
  readonly streams: readonly StreamRun[];
  /** the fairness figure (fairness.ts), if it ran: header and rows */
  readonly fairness?: { readonly head: readonly string[]; readonly rows: readonly string[][] };
}

/** The report as text (stdout) and as Markdown (the same tables). */
export function renderReport(r: Report): { text: string; markdown: string } {
  const cpuHead = [
    "CPU s/GiB",
    "raw pair",
    ...r.names.flatMap((n) => [`${n} back end`, `${n} guest`, `${n} host app`, `${n} total`]),
  ];
  const runHead = [
    "back end",
    "stream",
    "MiB/s",
    "back end",
    "guest",
    "host app",
    "raw peer",
    "guest packets",
    "guest irqs",
    "guest kicks",
    "longest gap ms",
    "CPU wait s",
  ];
  const runRows = r.streams.map((s) => {
    const perWall = (x: number) => fmt(x / s.seconds);
    const raw = s.kind === "raw";
    return [
      s.backend,
      s.key,
      fmt(s.mibps),
      raw ? "-" : perWall(s.cpu.backend),
      raw ? "-" : perWall(s.cpu.guest),
      perWall(s.cpu.host),
      raw ? perWall(s.cpu.peer) : "-",
      raw ? "-" : String(s.guestPackets),
      raw ? "-" : String(s.guestWakeups),
      raw ? "-" : String(s.guestKicks),
      fmt(s.maxGapMs),
      fmt(s.cpuWait),
    ];
  });
  const parts = (md: boolean) => {
    const render = md ? markdown : table;
    const out = [
      md ? r.header.map((l) => `- ${l}`).join("\n") : r.header.join("\n"),
      "",
      figureTable(r.rows, r.names, { markdown: md }),
    ];
    if (r.fairness !== undefined) out.push("", render(r.fairness.head, r.fairness.rows));
    if (r.cpuRows.length > 0) {
      out.push(
        "",
        "CPU seconds per GiB moved, per process (medians; raw pair = writer + reader):",
        "",
        render(cpuHead, r.cpuRows),
      );
    }
    if (r.streams.length > 0 && !md) {
      out.push(
        "",
        "Every stream run (CPU columns: seconds of CPU per second of wall clock):",
        render(runHead, runRows),
      );
    }
    return out.join("\n");
  };
  return { text: parts(false), markdown: parts(true) + "\n" };
}
