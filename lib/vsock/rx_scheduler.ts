/**
 * The RX scheduler: who gets the guest's next rx buffer.
 *
 * The guest's rx queue is one shared resource for every flow toward it: each connection
 * owing packets (control packets, or host data within the guest's credit), the standalone
 * RSTs owed for guest packets that matched no connection ("orphan" RSTs), and the packets
 * sibling VMs sent. The scheduler keeps:
 * - a round-robin queue of connections owing packets: each visit emits one packet, then
 *   the connection goes to the back of the queue if it still owes more, so no connection
 *   starves another;
 * - a bounded queue of orphan RSTs (MAX_PENDING_RESETS); when it is full the device stops
 *   taking tx packets until the guest takes replies (back-pressure instead of memory).
 *
 * Connections are queued at most once (`inRxQueue`), so the queue holds at most one entry
 * per connection. A connection that cannot use the buffer in hand (a header-only buffer
 * while it owes data) is passed over for that buffer and keeps its place (`passOver`,
 * `restorePassedOver`): one buffer visits each queued connection at most once, so a guest
 * posting buffers nobody can use costs one pass, never a loop.
 */
import type { VsockConnection } from "./connection.ts";

/** Standalone RSTs (for packets that match no connection) owed to the guest, at most. */
export const MAX_PENDING_RESETS = 1024;

/** A reply owed for a packet that matched no connection. */
export interface OrphanReset {
  localPort: number;
  peerPort: number;
  srcCid: number;
  type: number;
}

export class RxScheduler {
  #flows: VsockConnection[] = [];
  #head = 0;
  /** connections passed over for the buffer in hand, in queue order */
  readonly #passed: VsockConnection[] = [];
  #orphans: OrphanReset[] = [];
  #orphanHead = 0;

  /** Queues `c` (once) for an rx visit. */
  schedule(c: VsockConnection): void {
    if (!c.inRxQueue) {
      c.inRxQueue = true;
      this.#flows.push(c);
    }
  }

  /** Connections are waiting for a visit. */
  get hasFlows(): boolean {
    return this.#head < this.#flows.length;
  }

  /** The next connection to visit (taken off the queue), or undefined. */
  nextFlow(): VsockConnection | undefined {
    if (this.#head >= this.#flows.length) return undefined;
    const c = this.#flows[this.#head++];
    c.inRxQueue = false;
    return c;
  }

  /** Connections waiting for a visit. */
  get queuedFlows(): number {
    return this.#flows.length - this.#head;
  }

  /** `c` (just taken with `nextFlow`) cannot use the buffer in hand: it keeps its place. */
  passOver(c: VsockConnection): void {
    this.#passed.push(c);
  }

  /** Puts the connections passed over back at the head of the queue, in their order. */
  restorePassedOver(): void {
    const passed = this.#passed;
    for (let i = passed.length - 1; i >= 0; i--) {
      const c = passed[i];
      if (c.inRxQueue) continue; // re-queued meanwhile
      c.inRxQueue = true;
      if (this.#head > 0) this.#flows[--this.#head] = c;
      else this.#flows.unshift(c);
    }
    passed.length = 0;
  }

  /** Drops visited entries (call after an rx pass). */
  compact(): void {
    if (this.#head >= this.#flows.length) {
      this.#flows.length = 0;
      this.#head = 0;
    } else if (this.#head > 1024) {
      this.#flows = this.#flows.slice(this.#head);
      this.#head = 0;
    }
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
    this.#flows = [];
    this.#head = 0;
    this.#passed.length = 0;
    this.clearOrphans();
  }
}
