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

/**
 * Where a 64-byte ping-pong message carries timestamps (float64 epoch ms, little endian), so
 * a round trip splits into its legs: the host app's send time, the time the guest's driver
 * began the pass over its rings that found the message, the time it handed the message to
 * the echo service (its rx processing), and the guest's echo time. An
 * echo that does not stamp (the raw baseline's) leaves zeros. Bytes 0 and 63 keep the
 * pattern, which the host app checks.
 */
export const PING_STAMPED_SIZE = 64;
/** host app: when it wrote the message */
export const PING_STAMP_SENT = 8;
/** guest: when its rx processing handed the message to the echo service */
export const PING_STAMP_ARRIVED = 16;
/** guest: when it sent the message back */
export const PING_STAMP_ECHOED = 24;
/** guest: when the pass over its rings that found the message began (its "interrupt") */
export const PING_STAMP_PUMPED = 32;

/** Writes `t` (default: now) at `offset` of `msg` (a stamped ping-pong message). */
export function stampPing(msg: Uint8Array, offset: number, t = now()): void {
  new DataView(msg.buffer, msg.byteOffset, msg.byteLength).setFloat64(offset, t, true);
}
