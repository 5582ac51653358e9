/**
 * A bounded FIFO of bytes: what the guest sent on a connection that the host
 * socket could not take yet (guest -> host back-pressure).
 *
 * The bound is the `buf_alloc` we advertised: the guest may never have more
 * than that in flight, so a push beyond capacity means the guest broke the
 * credit rules (the connection is then reset, never silently truncated). The
 * storage is allocated on first use, so idle connections cost nothing.
 */
export class ByteQueue {
  #buf: Uint8Array | null = null;
  #head = 0;
  #tail = 0;

  constructor(public capacity: number) {}

  /** Raises the capacity (a larger window was advertised); storage follows on next use. */
  grow(capacity: number): void {
    if (capacity <= this.capacity) return;
    this.capacity = capacity;
    if (this.#buf !== null) {
      const bigger = new Uint8Array(capacity);
      bigger.set(this.#buf.subarray(this.#head, this.#tail));
      this.#tail -= this.#head;
      this.#head = 0;
      this.#buf = bigger;
    }
  }

  get length(): number {
    return this.#tail - this.#head;
  }

  get free(): number {
    return this.capacity - this.length;
  }

  /** A writable window of `n` bytes at the tail (caller fills it, then `commit(n)`). */
  reserve(n: number): Uint8Array | null {
    if (n > this.free) return null;
    if (this.#buf === null) this.#buf = new Uint8Array(this.capacity);
    if (this.#tail + n > this.capacity) {
      this.#buf.copyWithin(0, this.#head, this.#tail);
      this.#tail -= this.#head;
      this.#head = 0;
    }
    return this.#buf.subarray(this.#tail, this.#tail + n);
  }

  commit(n: number): void {
    this.#tail += n;
  }

  /** The queued bytes, oldest first (a view; valid until the next push). */
  peek(): Uint8Array {
    return this.#buf === null ? new Uint8Array(0) : this.#buf.subarray(this.#head, this.#tail);
  }

  /** Drops `n` bytes from the front. */
  consume(n: number): void {
    this.#head += n;
    if (this.#head === this.#tail) {
      this.#head = 0;
      this.#tail = 0;
    }
  }

  /** Drops the `n` newest bytes (an incomplete message the peer will never finish). */
  dropTail(n: number): void {
    this.#tail -= Math.min(n, this.length);
    if (this.#head === this.#tail) {
      this.#head = 0;
      this.#tail = 0;
    }
  }

  /** Frees the storage. */
  clear(): void {
    this.#buf = null;
    this.#head = 0;
    this.#tail = 0;
  }
}
