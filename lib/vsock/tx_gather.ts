/**
 * TX gather: the RW payloads of consecutive guest packets for one connection, written to
 * the host socket with one writev.
 *
 * A guest writing a stream sends a run of RW packets for the same connection (Linux splits
 * a large write into 64 KiB packets, and small writes arrive back to back). Writing each
 * payload with its own system call costs most of the guest -> host path, so the tx loop
 * collects the payloads' iovecs (pointing straight into guest memory) and writes them
 * together when the run ends: another connection's packet, a control packet, the iovec or
 * byte limit, or the end of the tx visit. The chains of a gathered run are published to
 * the guest only after the write (the tx loop flushes before it publishes), so the guest
 * cannot reuse a buffer whose bytes are still to be written. What the socket does not take
 * is copied from guest memory into the connection's backlog before publication.
 */
import { writevRaw } from "../../ffi/mod.ts";
import type { DescChain } from "../virtio/desc_chain.ts";
import type { GuestMemory } from "../virtio/memory.ts";
import { ConnState, type VsockConnection } from "./connection.ts";
import { VIRTIO_VSOCK_HDR_SIZE } from "./constants.ts";

/** Most iovecs one gathered writev carries (the kernel's UIO_MAXIOV is 1024). */
export const MAX_GATHER_IOV = 256;
/** Most payload bytes gathered into one writev. */
export const MAX_GATHER_BYTES = 512 * 1024;

export class TxGather {
  readonly #iov = new BigUint64Array(2 * MAX_GATHER_IOV);
  readonly #words = new Uint32Array(this.#iov.buffer);
  /** each iovec's region and offset, to copy what the socket did not take */
  readonly #segs = {
    region: new Int32Array(MAX_GATHER_IOV),
    offset: new Float64Array(MAX_GATHER_IOV),
  };
  #conn: VsockConnection | null = null;
  #mem: GuestMemory | null = null;
  #count = 0;
  #bytes = 0;

  /** The connection whose payloads are being gathered, if any. */
  get conn(): VsockConnection | null {
    return this.#conn;
  }

  /**
   * Adds the `len` payload bytes of `chain` (after its header) for `c`. Returns false when
   * they cannot be gathered; everything gathered before has then been written, so the
   * caller may write this payload itself without reordering.
   */
  add(c: VsockConnection, chain: DescChain, len: number): boolean {
    if (
      this.#conn !== null &&
      (this.#conn !== c || this.#count + chain.readableCount > MAX_GATHER_IOV ||
        this.#bytes + len > MAX_GATHER_BYTES)
    ) {
      this.flush();
    }
    // A flush that left bytes in c's backlog: this payload must queue behind them.
    if (c.closed || c.toHost.length > 0) return false;
    if (this.#count + chain.readableCount <= MAX_GATHER_IOV) {
      const n = chain.hostIovecs(
        chain.mem!,
        this.#iov,
        VIRTIO_VSOCK_HDR_SIZE,
        len,
        false,
        this.#count,
        this.#segs,
      );
      if (chain.iovBytes === len) {
        this.#conn = c;
        this.#mem = chain.mem;
        this.#count += n;
        this.#bytes += len;
        return true;
      }
    }
    this.flush();
    return false;
  }

  /**
   * Writes the gathered payloads with one writev; what the socket does not take goes to
   * the connection's backlog (copied from guest memory before the chains are published).
   */
  flush(): void {
    const c = this.#conn;
    if (c === null) return;
    const count = this.#count;
    const bytes = this.#bytes;
    const mem = this.#mem!;
    this.#conn = null;
    this.#mem = null;
    this.#count = 0;
    this.#bytes = 0;
    if (c.state === ConnState.CLOSED) return;
    const k = c.wroteToHost(writevRaw(c.hostFd, this.#iov, count), bytes);
    if (k > 0) { // the socket did not take the last k bytes: copy them into the backlog
      const q = c.toHost;
      this.#copy(mem, count, bytes - k, q.first);
      if (q.second.length > 0) this.#copy(mem, count, bytes - k + q.first.length, q.second);
      q.commit(k);
    }
  }

  /** Copies the gathered iovecs' bytes, from `skip` on, into `dst`. */
  #copy(mem: GuestMemory, count: number, skip: number, dst: Uint8Array): void {
    const w = this.#words;
    let off = 0;
    for (let i = 0; i < count && off < dst.length; i++) {
      const len = w[4 * i + 2];
      if (skip >= len) {
        skip -= len;
        continue;
      }
      const from = this.#segs.offset[i] + skip;
      const n = Math.min(len - skip, dst.length - off);
      dst.set(mem.regions[this.#segs.region[i]].bytes.subarray(from, from + n), off);
      off += n;
      skip = 0;
    }
  }
}
