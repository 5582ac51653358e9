/**
 * Benchmark payload and its integrity checks.
 *
 * Every byte stream the benchmark moves is a window of one periodic pattern: byte `o` of a
 * stream with shift `s` is `P[(s + o) % PATTERN_PERIOD]`. The period (1 MiB + 4 KiB + 4) is not a
 * multiple of any write size, so a chunk that is lost, repeated or reordered shows up as a
 * mismatch. `PATTERN_LENGTH` extends the array by `MAX_CHUNK` so any chunk of up to that size
 * is one contiguous `subarray` (senders copy nothing; checkers compare against one slice).
 *
 * Checks are cheap enough for the hot path in "sample" mode (16 bytes per chunk, whatever its
 * size) and complete in "full" mode (every byte, a tight typed-array loop; used by `--quick`
 * and the many-connection test). Many-connection streams start with an 8-byte header
 * (`STREAM_MAGIC`, connection id) so the receiver knows which shift to expect.
 */

/** Largest chunk a sender takes or a checker compares in one piece. */
export const MAX_CHUNK = 1 << 20;
/** Pattern period in bytes. */
export const PATTERN_PERIOD = MAX_CHUNK + 4096 + 4;
/** Length of the pattern array (period + one chunk of wrap-around). */
export const PATTERN_LENGTH = PATTERN_PERIOD + MAX_CHUNK;
/** First 4 bytes of a many-connection stream (little endian "VSKB"). */
export const STREAM_MAGIC = 0x424b5356;
/** Size of the many-connection stream header (magic, connection id). */
export const STREAM_HEADER_SIZE = 8;

/** How much of each chunk a checker compares. */
export type VerifyMode = "none" | "sample" | "full";

/** The pattern (deterministic: xorshift32, one step per 4 bytes). */
export function makePattern(): Uint8Array {
  const p = new Uint8Array(PATTERN_LENGTH);
  const words = new Uint32Array(p.buffer, 0, PATTERN_PERIOD >>> 2);
  let x = 0x9e3779b9;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
  for (let i = PATTERN_PERIOD; i < PATTERN_LENGTH; i++) p[i] = p[i - PATTERN_PERIOD];
  return p;
}

/** Stream shift of many-connection stream `id` (distinct for ids below ~250000). */
export function shiftOf(id: number): number {
  return (id * 4100 + 7) % PATTERN_PERIOD;
}

/** The `n` bytes (n <= MAX_CHUNK) at offset `off` of the stream with `shift`, as a view of `p`. */
export function chunkAt(p: Uint8Array, shift: number, off: number, n: number): Uint8Array {
  if (n > MAX_CHUNK) throw new RangeError(`chunk of ${n} bytes > ${MAX_CHUNK}`);
  const s = (shift + off) % PATTERN_PERIOD;
  return p.subarray(s, s + n);
}

/** The 8-byte header of many-connection stream `id`. */
export function streamHeader(id: number): Uint8Array {
  const h = new Uint8Array(STREAM_HEADER_SIZE);
  const v = new DataView(h.buffer);
  v.setUint32(0, STREAM_MAGIC, true);
  v.setUint32(4, id >>> 0, true);
  return h;
}

/** Parses a stream header: the connection id, or -1 if the magic is wrong. */
export function parseStreamHeader(h: Uint8Array): number {
  if (h.length < STREAM_HEADER_SIZE) return -1;
  const v = new DataView(h.buffer, h.byteOffset, STREAM_HEADER_SIZE);
  return v.getUint32(0, true) === STREAM_MAGIC ? v.getUint32(4, true) : -1;
}

/**
 * Checks a received stream chunk by chunk against the pattern. `offset` counts every byte
 * seen; the first mismatch is kept in `error` (later ones only counted in `mismatches`).
 */
export class StreamChecker {
  offset = 0;
  /** bytes actually compared */
  checked = 0;
  mismatches = 0;
  error: string | null = null;

  constructor(
    readonly pattern: Uint8Array,
    readonly mode: VerifyMode,
    readonly shift = 0,
    readonly label = "stream",
  ) {}

  /** Accounts for (and checks) the next received chunk. Returns false on a mismatch. */
  check(chunk: Uint8Array): boolean {
    const n = chunk.length;
    let ok = true;
    if (this.mode === "full") {
      for (let done = 0; done < n;) {
        const k = Math.min(n - done, MAX_CHUNK);
        const at = this.#compare(chunk.subarray(done, done + k), this.offset + done, 0, k);
        if (at >= 0) {
          ok = this.#fail(this.offset + done + at, chunk[done + at]);
          break;
        }
        done += k;
      }
      this.checked += n;
    } else if (this.mode === "sample" && n > 0) {
      // 8 bytes at the start and 8 at the end of the chunk.
      const head = Math.min(8, n);
      let at = this.#compare(chunk, this.offset, 0, head);
      if (at < 0 && n > head) at = this.#compare(chunk, this.offset, Math.max(head, n - 8), n);
      if (at >= 0) ok = this.#fail(this.offset + at, chunk[at]);
      this.checked += Math.min(n, 16);
    }
    this.offset += n;
    return ok;
  }

  /** Compares chunk[from, to) with the stream at `base + from`; index of a mismatch or -1. */
  #compare(chunk: Uint8Array, base: number, from: number, to: number): number {
    const s = (this.shift + base + from) % PATTERN_PERIOD - from;
    const p = this.pattern;
    for (let i = from; i < to; i++) {
      if (chunk[i] !== p[s + i]) return i;
    }
    return -1;
  }

  #fail(at: number, got: number): false {
    this.mismatches++;
    if (this.error === null) {
      const want = this.pattern[(this.shift + at) % PATTERN_PERIOD];
      this.error = `${this.label}: byte ${at} is ${got}, expected ${want}`;
    }
    return false;
  }
}
