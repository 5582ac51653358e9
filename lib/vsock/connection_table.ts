/**
 * Connections of one device, keyed by (host-side port, guest-side port).
 *
 * Two nested maps instead of one string key: looking a packet's connection up
 * allocates nothing, and both ports can be any u32.
 */
import type { VsockConnection } from "./connection.ts";

export class ConnectionTable {
  readonly #byLocal = new Map<number, Map<number, VsockConnection>>();
  #size = 0;

  get size(): number {
    return this.#size;
  }

  get(localPort: number, peerPort: number): VsockConnection | undefined {
    return this.#byLocal.get(localPort)?.get(peerPort);
  }

  has(localPort: number, peerPort: number): boolean {
    return this.get(localPort, peerPort) !== undefined;
  }

  add(c: VsockConnection): void {
    let inner = this.#byLocal.get(c.localPort);
    if (inner === undefined) {
      inner = new Map();
      this.#byLocal.set(c.localPort, inner);
    }
    if (!inner.has(c.peerPort)) this.#size++;
    inner.set(c.peerPort, c);
  }

  delete(c: VsockConnection): void {
    const inner = this.#byLocal.get(c.localPort);
    if (inner === undefined || inner.get(c.peerPort) !== c) return;
    inner.delete(c.peerPort);
    this.#size--;
    if (inner.size === 0) this.#byLocal.delete(c.localPort);
  }

  *all(): Generator<VsockConnection> {
    for (const inner of this.#byLocal.values()) yield* inner.values();
  }
}
