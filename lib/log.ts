/**
 * Levelled logging: one line per event, to stderr, `--log-level` filtered.
 *
 * Format: `<ISO time> <LEVEL> <message>`. Messages are built by the caller only
 * when the level is on (`if (log.debugOn) log.debug(...)` on hot paths).
 */

export const LOG_LEVELS = ["error", "warn", "info", "debug", "trace"] as const;
export type LogLevel = typeof LOG_LEVELS[number];

const encoder = new TextEncoder();

export class Logger {
  #threshold = 2; // info
  #prefix = "";

  setLevel(level: LogLevel): void {
    this.#threshold = LOG_LEVELS.indexOf(level);
  }
  get level(): LogLevel {
    return LOG_LEVELS[this.#threshold];
  }
  /** a tag printed after the level, e.g. the VM's CID */
  setPrefix(prefix: string): void {
    this.#prefix = prefix ? `${prefix} ` : "";
  }
  enabled(level: LogLevel): boolean {
    return LOG_LEVELS.indexOf(level) <= this.#threshold;
  }
  #write(n: number, msg: string): void {
    if (n > this.#threshold) return;
    const line = `${new Date().toISOString()} ${
      LOG_LEVELS[n].toUpperCase().padEnd(5)
    } ${this.#prefix}${msg.replaceAll("\n", "\\n")}\n`;
    try {
      Deno.stderr.writeSync(encoder.encode(line));
    } catch {
      // stderr closed: nowhere to log
    }
  }
  error(msg: string): void {
    this.#write(0, msg);
  }
  warn(msg: string): void {
    this.#write(1, msg);
  }
  info(msg: string): void {
    this.#write(2, msg);
  }
  debug(msg: string): void {
    if (this.#threshold >= 3) this.#write(3, msg);
  }
  trace(msg: string): void {
    if (this.#threshold >= 4) this.#write(4, msg);
  }
  get debugOn(): boolean {
    return this.#threshold >= 3;
  }
  get traceOn(): boolean {
    return this.#threshold >= 4;
  }
}

/** The process-wide (per-thread) logger. */
export const log: Logger = new Logger();

/**
 * A rate limit for log lines that a guest, a front end or a host app can trigger: at most
 * `burst` lines per `intervalMs`; what is held back is counted and reported in one summary
 * line when the next interval starts. Check `allow()` before building the message, so a
 * flood costs neither log volume nor string building:
 *
 * ```ts
 * const badPacketLog = new LogLimiter("bad packets from the guest");
 * if (badPacketLog.allow()) log.warn(`vsock: bad packet ...`);
 * ```
 */
export class LogLimiter {
  #windowStart = -Infinity;
  #count = 0;
  #suppressed = 0;

  constructor(
    /** what the lines are about, for the summary line */
    readonly what: string,
    readonly burst = 10,
    readonly intervalMs = 5000,
    /** level of the summary line (the held-back lines may be of any level) */
    readonly level: LogLevel = "info",
  ) {}

  /** Lines held back in the current interval. */
  get suppressed(): number {
    return this.#suppressed;
  }

  /** True if one more line may be written now. */
  allow(): boolean {
    const now = performance.now();
    if (now - this.#windowStart >= this.intervalMs) {
      if (this.#suppressed > 0) this.#summary(now);
      this.#windowStart = now;
      this.#count = 0;
      this.#suppressed = 0;
    }
    if (this.#count < this.burst) {
      this.#count++;
      return true;
    }
    this.#suppressed++;
    return false;
  }

  #summary(now: number): void {
    const secs = ((now - this.#windowStart) / 1000).toFixed(1);
    const line = `${this.what}: ${this.#suppressed} more lines suppressed in the last ${secs} s`;
    if (this.level === "error") log.error(line);
    else if (this.level === "warn") log.warn(line);
    else if (this.level === "info") log.info(line);
    else log.debug(line);
  }
}
