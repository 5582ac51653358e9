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
 * per connection.
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
  readonly #orphans: OrphanReset[] = [];

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
    return this.#orphans.length;
  }

  /** The orphan queue is full: stop producing more until the guest takes some. */
  get orphansFull(): boolean {
    return this.#orphans.length >= MAX_PENDING_RESETS;
  }

  /** Owes an orphan RST; false (dropped) when the queue is full. */
  addOrphan(o: OrphanReset): boolean {
    if (this.orphansFull) return false;
    this.#orphans.push(o);
    return true;
  }

  /** The next orphan RST to send, or undefined. */
  nextOrphan(): OrphanReset | undefined {
    return this.#orphans.pop();
  }

  /** Forgets the orphan RSTs (a load: the guest's old connections are gone). */
  clearOrphans(): void {
    this.#orphans.length = 0;
  }

  /** Forgets everything (device reset). */
  clear(): void {
    this.#flows = [];
    this.#head = 0;
    this.#orphans.length = 0;
  }
}
