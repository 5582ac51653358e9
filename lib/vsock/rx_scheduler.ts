/**
 * The RX scheduler: who gets the guest's next rx buffer.
 *
 * The guest's rx queue is one resource shared by every flow toward it: each stream or
 * seqpacket connection owing packets, each host source of datagrams, each sibling VM, and
 * the standalone RSTs owed for guest packets that matched no connection ("orphan" RSTs).
 * Datagrams carry no credit, so without scheduling a datagram flood would starve every
 * connection (the problem the 2022 vsock datagram RFC left to Linux's qdisc).
 *
 * Flows are served by deficit round robin (Shreedhar and Varghese): each flow waiting in
 * the queue gets RX_QUANTUM bytes (times its weight, `--rx-weight`) each time it reaches
 * the head, sends packets while its deficit is positive (a packet may overdraw it; the
 * overdraft is paid back in later rounds), then goes to the back. A flow with nothing
 * more to send leaves the queue and forgets its deficit. What a packet costs is the rx
 * buffer it takes, whole (`writableLen`), not the bytes it carries: the scarce resource is
 * the guest's rx queue, and a packet takes a whole buffer however short it is (a 1 KiB
 * datagram uses up one of Linux's 4 KiB buffers). So a flood of small datagrams gets the
 * same share of the rx queue as a bulk stream, not four times its share. A flow waits at
 * most one round for its turn: one quantum per other busy flow. A multi-buffer read
 * (several rx chains filled by one readv) counts whole against the deficit, and a flow
 * reads no further than its deficit allows (`RxFlow.deficit` is visible to it).
 *
 * Sparse flows first (the "new flows" queue of FQ-CoDel, RFC 8290 section 4.1): a flow that
 * arrives while in neither queue, such as an interactive connection with one 64-byte reply,
 * is served before the round-robin flows, for at most one quantum; then it joins the back of
 * the round robin (and an idle one leaves when its turn finds it idle). So its reply waits
 * for no bulk flow's quantum, and since a flow can only be sparse again after it sat out a
 * whole round, flows that wake up often cannot starve the others.
 *
 * Orphan RSTs go first, oldest first, from a bounded queue (MAX_PENDING_RESETS); when it is
 * full the device stops taking tx packets until the guest takes replies (back-pressure
 * instead of memory).
 *
 * A flow is queued at most once (`inRxQueue`). One rx buffer visits each queued flow at most
 * once: a flow that cannot use the buffer in hand (say a header-only buffer while it owes
 * data, see `canSendInto`) is passed over for that buffer and keeps its place, so a guest
 * posting buffers nobody can use costs one pass, never a loop.
 */
import type { DescChain } from "../virtio/desc_chain.ts";
import { MAX_PKT_PAYLOAD, VIRTIO_VSOCK_HDR_SIZE } from "./constants.ts";

/** Standalone RSTs (for packets that match no connection) owed to the guest, at most. */
export const MAX_PENDING_RESETS = 1024;

/**
 * Bytes a flow may send per round of weight 1: one maximal packet (64 KiB of payload). A
 * stream fills up to this much of the guest's rx buffers with one read (see rx_batch.ts), so
 * an interactive flow waits at most one quantum per busy flow, and a bulk flow still reads
 * 64 KiB per system call into Linux's 4 KiB buffers.
 */
export const RX_QUANTUM = MAX_PKT_PAYLOAD + VIRTIO_VSOCK_HDR_SIZE;

/** Rounds one buffer may go through while every flow pays back an overdraft. */
const MAX_DEBT_ROUNDS = Math.ceil((MAX_PKT_PAYLOAD + VIRTIO_VSOCK_HDR_SIZE) / RX_QUANTUM) + 1;

/** A reply owed for a packet that matched no connection. */
export interface OrphanReset {
  localPort: number;
  peerPort: number;
  srcCid: number;
  type: number;
}

/** Something that sends packets to the guest: a connection, a datagram source, a sibling. */
export interface RxFlow {
  /** in the scheduler's queue (managed by the scheduler) */
  inRxQueue: boolean;
  /** bytes left in this round (managed by the scheduler) */
  deficit: number;
  /** share of the rx queue relative to other flows (1 = RX_QUANTUM per round) */
  readonly weight: number;
  /** the flow is gone and owes nothing: drop it from the queue */
  readonly done: boolean;
  /** something to send right now */
  hasRxWork(): boolean;
  /** whether `fillRx` can use a buffer with `room` bytes after the header */
  canSendInto(room: number): boolean;
  /** writes the next packet into `chain`; returns its length, or -1 if none went in */
  fillRx(chain: DescChain): number;
}

/** A queue of flows: an array with a moving head (no per-packet allocation). */
class FlowQueue {
  items: RxFlow[] = [];
  head = 0;

  get length(): number {
    return this.items.length - this.head;
  }

  get first(): RxFlow {
    return this.items[this.head];
  }

  push(f: RxFlow): void {
    this.items.push(f);
  }

  shift(): RxFlow {
    return this.items[this.head++];
  }

  /** Puts `f` back at the head. */
  unshift(f: RxFlow): void {
    if (this.head > 0) this.items[--this.head] = f;
    else this.items.unshift(f);
  }

  /** Drops visited entries. */
  compact(): void {
    if (this.head >= this.items.length) {
      this.items.length = 0;
      this.head = 0;
    } else if (this.head > 1024) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
  }

  /** Empties the queue, telling every flow it left. */
  clear(): void {
    for (let i = this.head; i < this.items.length; i++) this.items[i].inRxQueue = false;
    this.items = [];
    this.head = 0;
  }
}

export class RxScheduler {
  /** flows that arrived idle ("sparse"): served first, with one fresh quantum */
  readonly #sparse = new FlowQueue();
  /** flows that used their first quantum (or emptied): deficit round robin */
  readonly #bulk = new FlowQueue();
  /** flows passed over for the buffer in hand, in queue order */
  readonly #passed: RxFlow[] = [];
  #orphans: OrphanReset[] = [];
  #orphanHead = 0;

  /**
   * Queues `f` (once) for RX. A flow that was in neither queue arrived idle: it goes to the
   * sparse queue with a fresh quantum.
   */
  schedule(f: RxFlow): void {
    if (!f.inRxQueue) {
      f.inRxQueue = true;
      f.deficit = RX_QUANTUM * f.weight;
      this.#sparse.push(f);
    }
  }

  /** Flows are waiting. */
  get hasFlows(): boolean {
    return this.#sparse.length > 0 || this.#bulk.length > 0;
  }

  /** Flows waiting. */
  get queuedFlows(): number {
    return this.#sparse.length + this.#bulk.length;
  }

  /**
   * Fills `chain` from the flows: sparse flows first, then deficit round robin over the
   * others; returns the packet's length, or -1 if no queued flow could use this buffer (each
   * was visited once; all keep their place).
   */
  fill(chain: DescChain): number {
    const room = chain.writableLen - VIRTIO_VSOCK_HDR_SIZE;
    const len = this.#fillSparse(chain, room);
    this.servedSparse = len >= 0;
    return len >= 0 ? len : this.#fillRoundRobin(chain, room);
  }

  /**
   * The last `fill` served a sparse flow (an interactive connection's message, say): the
   * device publishes it at once rather than after the rest of its visit's bulk buffers.
   */
  servedSparse = false;

  /**
   * Serves the sparse queue in order. A sparse flow that used up its quantum, or has
   * nothing more to send, moves to the back of the round-robin queue (an emptied one is
   * dropped there when its turn finds it idle): so a flow must stay idle for a whole round
   * before it counts as sparse again, and flows that wake up often cannot starve the others.
   */
  #fillSparse(chain: DescChain, room: number): number {
    const q = this.#sparse;
    let len = -1;
    for (let budget = q.length; budget > 0 && q.length > 0; budget--) {
      const f = q.first;
      if (f.done) {
        this.#dequeue(q);
        continue;
      }
      if (f.hasRxWork() && !f.canSendInto(room)) { // keeps its place and its deficit
        this.#passed.push(q.shift());
        continue;
      }
      if (f.hasRxWork()) {
        len = f.fillRx(chain);
        if (len > 0) f.deficit -= chain.writableLen;
      }
      if (f.done) this.#dequeue(q);
      else if (len < 0 || f.deficit <= 0 || !f.hasRxWork()) this.#bulk.push(q.shift());
      if (len >= 0) break;
    }
    this.#restorePassedOver(q);
    return len;
  }

  /** Deficit round robin over the flows past their first quantum. */
  #fillRoundRobin(chain: DescChain, room: number): number {
    const q = this.#bulk;
    let len = -1;
    // One pass visits each queued flow once. A pass in which every flow was still paying
    // back an overdraft is a round without sends: DRR goes on to the next round (a flow's
    // debt is at most one packet, so this ends within MAX_PKT_PAYLOAD / RX_QUANTUM rounds).
    for (let rounds = 0; len < 0 && rounds <= MAX_DEBT_ROUNDS; rounds++) {
      let inDebt = 0;
      for (let budget = q.length; budget > 0 && q.length > 0; budget--) {
        const f = q.first;
        if (f.done || !f.hasRxWork()) {
          this.#dequeue(q);
          continue;
        }
        if (f.deficit <= 0) {
          f.deficit += RX_QUANTUM * f.weight;
          if (f.deficit <= 0) { // still paying back an overdraft: skip this round
            q.push(q.shift());
            inDebt++;
            continue;
          }
        }
        if (!f.canSendInto(room)) { // keeps its place and its deficit
          this.#passed.push(q.shift());
          continue;
        }
        len = f.fillRx(chain);
        if (len > 0) f.deficit -= chain.writableLen;
        if (!f.hasRxWork() || f.done) this.#dequeue(q);
        else if (f.deficit <= 0 || len < 0) q.push(q.shift());
        if (len >= 0) break;
      }
      this.#restorePassedOver(q);
      if (inDebt === 0) break;
    }
    return len;
  }

  /** Takes the head flow off `q` (it forgets its deficit). */
  #dequeue(q: FlowQueue): void {
    const f = q.shift();
    f.inRxQueue = false;
    f.deficit = 0;
  }

  /** Puts the flows passed over back at the head of `q`, in their order. */
  #restorePassedOver(q: FlowQueue): void {
    const passed = this.#passed;
    for (let i = passed.length - 1; i >= 0; i--) q.unshift(passed[i]);
    passed.length = 0;
  }

  /** Drops visited entries (call after an rx pass). */
  compact(): void {
    this.#sparse.compact();
    this.#bulk.compact();
  }

  /** Orphan RSTs owed. */
  get orphanCount(): number {
    return this.#orphans.length - this.#orphanHead;
  }

  /** The orphan queue is full: stop producing more until the guest takes some. */
  get orphansFull(): boolean {
    return this.orphanCount >= MAX_PENDING_RESETS;
  }

  /** Owes an orphan RST; false (dropped) when the queue is full. */
  addOrphan(o: OrphanReset): boolean {
    if (this.orphansFull) return false;
    this.#orphans.push(o);
    return true;
  }

  /** The next orphan RST to send (oldest first), or undefined. */
  nextOrphan(): OrphanReset | undefined {
    if (this.#orphanHead >= this.#orphans.length) return undefined;
    const o = this.#orphans[this.#orphanHead++];
    if (this.#orphanHead === this.#orphans.length) this.clearOrphans();
    else if (this.#orphanHead > MAX_PENDING_RESETS) {
      this.#orphans = this.#orphans.slice(this.#orphanHead);
      this.#orphanHead = 0;
    }
    return o;
  }

  /** Forgets the orphan RSTs (a load: the guest's old connections are gone). */
  clearOrphans(): void {
    this.#orphans = [];
    this.#orphanHead = 0;
  }

  /** Forgets everything (device reset). */
  clear(): void {
    this.#sparse.clear();
    this.#bulk.clear();
    this.#passed.length = 0;
    this.clearOrphans();
  }
}
