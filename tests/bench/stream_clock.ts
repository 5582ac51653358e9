/**
 * The benchmark streams' clock: epoch milliseconds comparable across the bench's processes
 * (a sender's start and a receiver's EOF come from different processes), and the timing a
 * receiving end keeps of one stream, with the result every sink reports (the guest's
 * `sink`/`mix`, the host app's `sink`, the raw fairness mix), read by runs.ts and fairness.ts.
 */
import type { StreamChecker, VerifyMode } from "./pattern.ts";

/** Epoch milliseconds with sub-ms resolution, comparable across the bench processes. */
export function now(): number {
  return performance.timeOrigin + performance.now();
}

/** When a stream's data arrived: first arrival, EOF, the longest pause between arrivals. */
export class ArrivalClock {
  /** epoch ms of the first arrival (0: none yet) */
  tFirst = 0;
  /** epoch ms of EOF (0: not yet) */
  tEnd = 0;
  /** longest time without new data once data flows (a stall shows up here) */
  maxGapMs = 0;
  #lastAt = 0;

  /** Notes that data arrived. */
  arrived(): void {
    const t = performance.now();
    if (this.tFirst === 0) this.tFirst = now();
    else if (t - this.#lastAt > this.maxGapMs) this.maxGapMs = t - this.#lastAt;
    this.#lastAt = t;
  }

  /** Notes EOF (the first call counts). */
  ended(): void {
    if (this.tEnd === 0) this.tEnd = now();
  }
}

/** A sink's report of one stream: `bytes` received, its timing and the checker's verdict. */
export function sinkResult(
  bytes: number,
  clock: ArrivalClock,
  checker: StreamChecker,
  verify: VerifyMode,
) {
  return {
    bytes,
    tFirst: clock.tFirst,
    tEnd: clock.tEnd,
    maxGapMs: clock.maxGapMs,
    checked: checker.checked,
    mismatches: verify === "none" ? 0 : checker.mismatches,
    error: checker.error,
  };
}
