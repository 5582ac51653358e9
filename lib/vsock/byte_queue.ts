/**
 * A bounded FIFO of bytes: what the guest sent on a connection that the host
 * socket could not take yet (guest -> host back-pressure).
 *
 * The bound is the `buf_alloc` we advertised: the guest may never have more
 * than that in flight, so a push beyond capacity means the guest broke the
 * credit rules (the connection is then reset, never silently truncated). The
 * storage is allocated on first use, so idle connections cost nothing.
 *
 * The storage is a ring: bytes are never moved to make room. (Compacting a
 * linear buffer whenever its tail reached the end cost a copy of everything
 * queued each time; with a 4 MiB autotuned window and a host app that reads a
 * little slower than the guest writes, that was a third of the back end's CPU.)
 * So a reservation or the bytes at the front may be in two parts: `first`, and
 * `second` at the start of the storage (empty when the part did not wrap).
 */
const EMPTY = new Uint8Array(0);

export class ByteQueue {
  #buf: Uint8Array | null = null;
  /** index of the oldest byte in #buf */
  #head = 0;
  #length = 0;
  /** the window `reserve` handed out: fill `first`, then `second`, then `commit` */
  first: Uint8Array = EMPTY;
  second: Uint8Array = EMPTY;

  constructor(public capacity: number) {}

  /** Raises the capacity (a larger window was advertised); storage follows on next use. */
  grow(capacity: number): void {
    if (capacity <= this.capacity) return;
    this.capacity = capacity;
    if (this.#buf !== null) {
      const bigger = new Uint8Array(capacity);
      const a = this.#frontRun();
      bigger.set(a);
      bigger.set(this.#buf.subarray(0, this.#length - a.length), a.length);
      this.#head = 0;
      this.#buf = bigger;
    }
  }

  get length(): number {
    return this.#length;
  }

  get free(): number {
    return this.capacity - this.#length;
  }

  /**
   * Reserves `n` bytes at the tail: `first` and `second` (empty unless the window wraps)
   * are where the caller copies them, then `commit(n)`. False when `n` exceeds `free`.
   */
  reserve(n: number): boolean {
    if (n > this.free) return false;
    if (this.#buf === null) this.#buf = new Uint8Array(this.capacity);
    const size = this.#buf.length;
    let tail = this.#head + this.#length;
    if (tail >= size) tail -= size;
    if (tail + n <= size) {
      this.first = this.#buf.subarray(tail, tail + n);
      this.second = EMPTY;
    } else {
      this.first = this.#buf.subarray(tail, size);
      this.second = this.#buf.subarray(0, n - (size - tail));
    }
    return true;
  }

  commit(n: number): void {
    this.#length += n;
  }

  /** The oldest queued bytes that are contiguous in the storage (all of them unless wrapped). */
  front(): Uint8Array {
    return this.#buf === null ? EMPTY : this.#frontRun();
  }

  /**
   * The `n` oldest bytes (n <= length) as views: `[first part, second part]`, the second
   * empty unless they wrap. Valid until the next reserve.
   */
  peek(n: number): [Uint8Array, Uint8Array] {
    const a = this.front();
    if (n <= a.length) return [a.subarray(0, n), EMPTY];
    return [a, this.#buf!.subarray(0, n - a.length)];
  }

  /** Drops `n` bytes from the front. */
  consume(n: number): void {
    this.#length -= n;
    if (this.#length <= 0) {
      this.#length = 0;
      this.#head = 0;
      return;
    }
    this.#head += n;
    if (this.#head >= this.#buf!.length) this.#head -= this.#buf!.length;
  }

  /** Drops the `n` newest bytes (an incomplete message the peer will never finish). */
  dropTail(n: number): void {
    this.#length -= Math.min(n, this.#length);
    if (this.#length === 0) this.#head = 0;
  }

  /** Frees the storage. */
  clear(): void {
    this.#buf = null;
    this.#head = 0;
    this.#length = 0;
    this.first = this.second = EMPTY;
  }

  #frontRun(): Uint8Array {
    const buf = this.#buf!;
    return buf.subarray(this.#head, Math.min(this.#head + this.#length, buf.length));
  }
}
