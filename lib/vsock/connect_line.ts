/**
 * The host side of the hybrid-vsock handshake (Firecracker's protocol, shared by rust-vmm's
 * vhost-device-vsock and Cloud Hypervisor): a host application connects to the backend's
 * Unix socket and writes one line
 *
 *     CONNECT <port>\n
 *
 * naming the guest vsock port it wants. Once the guest accepts, the backend answers
 * `OK <host-port>\n` (`formatOkLine`) and the socket carries the stream; if the guest
 * refuses, the socket is closed. The client may send data right after the newline, even in
 * the same write, so the parser hands back whatever follows the newline (`rest`) to be
 * forwarded as the first payload (vhost-device-vsock 0.3.0 lost it in a buffered reader).
 *
 * What others accept: Firecracker and vhost-device-vsock read at most 32 bytes up to the
 * first `\n`, split them on whitespace, compare the first word to "connect" ignoring case
 * and parse the second as a u32 (Rust `str::parse`), ignoring any further words. Newer
 * variants require exactly `connect ` as a prefix and trim the port.
 *
 * What we accept, byte by byte (so the line may arrive in any number of pieces):
 * - optional leading whitespace, then `CONNECT` in any letter case;
 * - one or more whitespace bytes, then the port: decimal digits (leading zeros allowed, no
 *   sign), at most 4294967295;
 * - optional trailing whitespace (so `\r\n` works), then `\n`.
 * "Whitespace" is space, tab, CR, VT, FF (ASCII whitespace except LF). Anything else, a
 * third word, an empty port, an out-of-range port or a line longer than MAX_CONNECT_LINE
 * bytes (newline included, the 32 of Firecracker's buffer) is an error, reported as soon as
 * the offending byte arrives. The parser keeps no buffer, only a few integers of state, so
 * a client that never sends a newline costs nothing and is refused at byte 32.
 */

/** Longest accepted CONNECT line in bytes, newline included (Firecracker's buffer size). */
export const MAX_CONNECT_LINE = 32;

/** Largest port number (u32). */
const MAX_PORT = 0xffffffff;

/** Result of `ConnectLineParser.feed`. */
export type ConnectLineResult =
  | { readonly state: "need-more" }
  | {
    readonly state: "ok";
    /** Destination guest port. */
    readonly port: number;
    /**
     * Bytes of the chunk after the newline, to forward as data. A view into the chunk
     * passed to `feed` (no copy): copy it before the chunk's buffer is reused.
     */
    readonly rest: Uint8Array;
  }
  | { readonly state: "error"; readonly reason: ConnectLineError };

/** Reasons a CONNECT line is refused (constant strings). */
export const ConnectLineErrors = {
  BAD_KEYWORD: "line does not start with CONNECT",
  NO_SEPARATOR: "expected whitespace after CONNECT",
  NO_PORT: "missing port number",
  BAD_PORT: "port is not a decimal number",
  PORT_RANGE: "port exceeds 4294967295",
  TRAILING: "unexpected bytes after the port",
  TOO_LONG: "CONNECT line longer than 32 bytes",
  FINISHED: "the CONNECT line was already parsed",
} as const;

/** One of the `ConnectLineErrors` strings. */
export type ConnectLineError = typeof ConnectLineErrors[keyof typeof ConnectLineErrors];

const NEED_MORE: ConnectLineResult = Object.freeze({ state: "need-more" });

/** "connect" in lower case, as byte values. */
const KEYWORD = [0x63, 0x6f, 0x6e, 0x6e, 0x65, 0x63, 0x74];

const LF = 0x0a;

function isSpace(b: number): boolean {
  // tab, VT, FF, CR, space
  return b === 0x20 || b === 0x09 || b === 0x0b || b === 0x0c || b === 0x0d;
}

const enum St {
  /** Before the keyword: whitespace or its first letter. */
  Lead,
  /** Inside the keyword; `kw` letters matched. */
  Keyword,
  /** Right after the keyword: at least one whitespace byte required. */
  Separator,
  /** Whitespace before the port. */
  BeforePort,
  /** In the port's digits. */
  Port,
  /** Whitespace after the port. */
  Trailing,
  Done,
  Failed,
}

/** Incremental parser of one `CONNECT <port>\n` line. One instance per host connection. */
export class ConnectLineParser {
  #st: St = St.Lead;
  #kw = 0;
  #port = 0;
  #count = 0;
  #error: ConnectLineError = ConnectLineErrors.FINISHED;

  /** Bytes of the line consumed so far (never more than MAX_CONNECT_LINE). */
  get bytesConsumed(): number {
    return this.#count;
  }

  /**
   * Feeds the next bytes read from the host socket. Returns "need-more" until the line is
   * complete, then "ok" once (with the bytes after the newline), or "error". After an
   * error every call returns the same error; after "ok", further calls are an error.
   */
  feed(chunk: Uint8Array): ConnectLineResult {
    if (this.#st === St.Done) return this.#fail(ConnectLineErrors.FINISHED);
    if (this.#st === St.Failed) return { state: "error", reason: this.#error };
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i];
      this.#count++;
      if (b === LF) {
        switch (this.#st) {
          case St.Port:
          case St.Trailing:
            this.#st = St.Done;
            return { state: "ok", port: this.#port, rest: chunk.subarray(i + 1) };
          case St.Lead:
          case St.Keyword:
            return this.#fail(ConnectLineErrors.BAD_KEYWORD);
          default:
            return this.#fail(ConnectLineErrors.NO_PORT);
        }
      }
      if (this.#count >= MAX_CONNECT_LINE) return this.#fail(ConnectLineErrors.TOO_LONG);
      const err = this.#step(b);
      if (err !== null) return this.#fail(err);
    }
    return NEED_MORE;
  }

  /** Advances the state machine over one byte that is not LF. */
  #step(b: number): ConnectLineError | null {
    switch (this.#st) {
      case St.Lead:
        if (isSpace(b)) return null;
        if ((b | 0x20) !== KEYWORD[0]) return ConnectLineErrors.BAD_KEYWORD;
        this.#st = St.Keyword;
        this.#kw = 1;
        return null;
      case St.Keyword:
        // `| 0x20` folds ASCII upper case to lower case; it maps no other byte to a letter
        // of "connect" except the letters themselves and their upper-case forms.
        if ((b | 0x20) !== KEYWORD[this.#kw]) return ConnectLineErrors.BAD_KEYWORD;
        if (++this.#kw === KEYWORD.length) this.#st = St.Separator;
        return null;
      case St.Separator:
        if (!isSpace(b)) return ConnectLineErrors.NO_SEPARATOR;
        this.#st = St.BeforePort;
        return null;
      case St.BeforePort:
        if (isSpace(b)) return null;
        if (b < 0x30 || b > 0x39) return ConnectLineErrors.BAD_PORT;
        this.#port = b - 0x30;
        this.#st = St.Port;
        return null;
      case St.Port:
        if (isSpace(b)) {
          this.#st = St.Trailing;
          return null;
        }
        if (b < 0x30 || b > 0x39) return ConnectLineErrors.BAD_PORT;
        this.#port = this.#port * 10 + (b - 0x30);
        return this.#port > MAX_PORT ? ConnectLineErrors.PORT_RANGE : null;
      case St.Trailing:
        return isSpace(b) ? null : ConnectLineErrors.TRAILING;
      default:
        return ConnectLineErrors.FINISHED;
    }
  }

  #fail(reason: ConnectLineError): ConnectLineResult {
    this.#st = St.Failed;
    this.#error = reason;
    return { state: "error", reason };
  }
}

/** The backend's answer once the guest accepted: `OK <hostPort>\n`. */
export function formatOkLine(hostPort: number): string {
  if (hostPort >>> 0 !== hostPort) throw new RangeError(`invalid host port ${hostPort}`);
  return `OK ${hostPort}\n`;
}
