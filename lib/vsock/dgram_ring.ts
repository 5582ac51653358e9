/**
 * The queue of one datagram flow (host port -> guest port, see dgram.ts): the datagrams a
 * host app sent that wait for the guest's rx buffers, in arrival order.
 *
 * Datagrams are copied into one preallocated byte ring, each one contiguous (a datagram that
 * would run past the end of the storage starts again at its beginning), so queueing a
 * datagram allocates no buffer (a flood of tens of thousands of datagrams per second used to
 * cost as many fresh buffers, each a copy). The storage starts
 * small (INITIAL_CAPACITY, so a quiet flow costs little) and doubles, datagrams moved to its
 * front, when a datagram does not fit, up to `maxCapacity`. So the ring is bounded twice: at
 * most `maxPackets` datagrams, and whatever fits `maxCapacity` bytes (the unused tail a
 * wrapped datagram skips counts as used until the datagrams before it are gone). A datagram
 * that does not fit then is the caller's to drop.
 */
/** Bytes of storage a new ring starts with. */
export const INITIAL_CAPACITY = 16 * 1024;

export class DatagramRing {
  #store: Uint8Array;
  /** offset in #store of each queued datagram, from #head, #count of them */
  readonly #starts: Uint32Array;
  readonly #lens: Uint32Array;
  #head = 0;
  #count = 0;
  /** payload bytes queued */
  #bytes = 0;
  /** where the next datagram goes if it fits before the end of the storage */
  #tail = 0;
  /** the newest datagrams started again at the beginning: used is [oldest, end) + [0, tail) */
  #wrapped = false;

  constructor(readonly maxCapacity: number, readonly maxPackets: number) {
    this.#store = new Uint8Array(Math.min(INITIAL_CAPACITY, maxCapacity));
    this.#starts = new Uint32Array(maxPackets);
    this.#lens = new Uint32Array(maxPackets);
  }

  /** Datagrams queued. */
  get length(): number {
    return this.#count;
  }

  /** Payload bytes queued. */
  get bytes(): number {
    return this.#bytes;
  }

  /** Bytes of storage now. */
  get capacity(): number {
    return this.#store.length;
  }

  /** Where a datagram of `n` bytes would go, or -1 if it does not fit now. */
  #placeFor(n: number): number {
    if (this.#count >= this.maxPackets || n > this.capacity) return -1;
    if (this.#count === 0) return 0;
    const oldest = this.#starts[this.#head];
    if (!this.#wrapped) {
      // Used: [oldest, tail). Free: [tail, capacity), then [0, oldest).
      if (this.#tail + n <= this.capacity) return this.#tail;
      return n <= oldest ? 0 : -1;
    }
    // Used: [oldest, capacity) and [0, tail). Free: [tail, oldest).
    return this.#tail + n <= oldest ? this.#tail : -1;
  }

  /** Queues a copy of `d`; false (nothing queued) if it does not fit. */
  push(d: Uint8Array): boolean {
    let at = this.#placeFor(d.length);
    if (at < 0 && this.#count < this.maxPackets && this.#grow(this.#bytes + d.length)) {
      at = this.#placeFor(d.length);
    }
    if (at < 0) return false;
    this.#store.set(d, at);
    if (this.#count > 0 && at < this.#tail) this.#wrapped = true;
    let i = this.#head + this.#count;
    if (i >= this.maxPackets) i -= this.maxPackets;
    this.#starts[i] = at;
    this.#lens[i] = d.length;
    this.#count++;
    this.#bytes += d.length;
    this.#tail = at + d.length;
    return true;
  }

  /** The oldest datagram (a view into the storage, valid until `shift`); count > 0. */
  front(): Uint8Array {
    const start = this.#starts[this.#head];
    return this.#store.subarray(start, start + this.#lens[this.#head]);
  }

  /** Length of the oldest datagram; count > 0. */
  get frontLength(): number {
    return this.#lens[this.#head];
  }

  /** Drops the oldest datagram. */
  shift(): void {
    if (this.#count === 0) return;
    const start = this.#starts[this.#head];
    this.#bytes -= this.#lens[this.#head];
    this.#count--;
    this.#head = this.#head + 1 === this.maxPackets ? 0 : this.#head + 1;
    if (this.#count === 0) this.clear();
    // The new oldest is the first of the wrapped ones: the used part is one run again.
    else if (this.#wrapped && this.#starts[this.#head] < start) this.#wrapped = false;
  }

  /**
   * Doubles the storage (until `need` bytes fit; at most maxCapacity), moving the queued
   * datagrams to its front in order; false if `need` exceeds maxCapacity.
   */
  #grow(need: number): boolean {
    if (need > this.maxCapacity || this.capacity >= this.maxCapacity) return false;
    let size = this.capacity * 2;
    while (size < need) size *= 2;
    const store = new Uint8Array(Math.min(size, this.maxCapacity));
    let at = 0;
    for (let k = 0, i = this.#head; k < this.#count; k++) {
      const start = this.#starts[i];
      const len = this.#lens[i];
      store.set(this.#store.subarray(start, start + len), at);
      this.#starts[i] = at;
      at += len;
      i = i + 1 === this.maxPackets ? 0 : i + 1;
    }
    this.#store = store;
    this.#tail = at;
    this.#wrapped = false;
    return true;
  }

  /** Forgets every datagram (the storage is kept). */
  clear(): void {
    this.#head = 0;
    this.#count = 0;
    this.#bytes = 0;
    this.#tail = 0;
    this.#wrapped = false;
  }
}
