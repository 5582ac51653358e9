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
