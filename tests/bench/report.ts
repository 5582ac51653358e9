/**
 * The benchmark's report: figures with their same-run baseline and ratio, printed as a table
 * and written as JSON.
 */

/** Whether a bigger or a smaller value is better (decides how a target is read). */
export type Better = "higher" | "lower";

/** One reported figure. */
export interface Figure {
  /** stable key for JSON consumers, e.g. "g2h_64k_throughput" */
  readonly key: string;
  /** what the row shows */
  readonly name: string;
  readonly unit: string;
  /** the back end's value (NaN when not measured) */
  readonly ours: number;
  /** the same-run baseline (NaN when there is none) */
  readonly baseline: number;
  /** ours / baseline (NaN without a baseline) */
  readonly ratio: number;
  readonly better: Better;
  /**
   * the goal: a ratio bound when `targetOn` is "ratio", else a bound on `ours`; NaN for none
   */
  readonly target: number;
  readonly targetOn: "ratio" | "value";
  /** target met (null without a target) */
  readonly met: boolean | null;
  /** extra text for the row (e.g. "1000/1000 intact") */
  readonly note?: string;
}

/** Builds a figure, computing ratio and whether the target is met. */
export function figure(
  f: Omit<Figure, "ratio" | "met" | "target" | "targetOn"> & {
    target?: number;
    targetOn?: "ratio" | "value";
  },
  opts: { withTargets?: boolean } = {},
): Figure {
  const ratio = Number.isFinite(f.baseline) && f.baseline !== 0 ? f.ours / f.baseline : NaN;
  const target = opts.withTargets === false ? NaN : f.target ?? NaN;
  const targetOn = f.targetOn ?? "ratio";
  let met: boolean | null = null;
  if (Number.isFinite(target)) {
    const v = targetOn === "ratio" ? ratio : f.ours;
    met = Number.isFinite(v) ? (f.better === "higher" ? v >= target : v <= target) : false;
  }
  return { ...f, ratio, target, targetOn, met };
}

function fmt(x: number): string {
  if (!Number.isFinite(x)) return "-";
  const a = Math.abs(x);
  if (a >= 1000) return x.toFixed(0);
  if (a >= 100) return x.toFixed(1);
  if (a >= 10) return x.toFixed(2);
  return x.toFixed(3);
}

function targetText(f: Figure): string {
  if (!Number.isFinite(f.target)) return "";
  const op = f.better === "higher" ? ">=" : "<=";
  const what = f.targetOn === "ratio" ? `ratio ${op} ${f.target}` : `${op} ${f.target} ${f.unit}`;
  return `${what}: ${f.met ? "met" : "MISSED"}`;
}

/** Renders `rows` as an aligned text table. */
export function table(header: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: readonly string[]) =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ")
      .trimEnd();
  return [line(header), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line)].join("\n");
}

/** The figures as a table: figure, ours, baseline, ratio, target. */
export function figureTable(figures: readonly Figure[]): string {
  return table(
    ["figure", "ours", "baseline", "ratio", "target"],
    figures.map((f) => [
      `${f.name} (${f.unit})`,
      f.note ?? fmt(f.ours),
      fmt(f.baseline),
      Number.isFinite(f.ratio) ? f.ratio.toFixed(2) : "-",
      targetText(f),
    ]),
  );
}

export { fmt };
