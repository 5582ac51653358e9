/**
 * Multi-buffer reads host -> guest: more rx chains for the packet being filled.
 *
 * Linux posts rx buffers of 4 KiB, so a stream connection with 64 KiB waiting in its host
 * socket would cost sixteen readv calls, one per buffer. Instead the connection filling the
 * rx buffer in hand asks this pool for further chains from the same ring, reads once into
 * all of them (iovecs spanning the chains, each skipping its header room), and makes one
 * packet per chain. The packets are returned to the guest in ring order: the device pushes
 * the chain it handed out first, then the extra ones (`flushUsed`), so the stream's bytes
 * reach the driver in order. Chains taken but not filled go back to the avail ring (the
 * avail ring is consumed in order, so they are "un-popped" newest first).
 */
import { DescChain } from "../virtio/desc_chain.ts";
import { POP_CHAIN, POP_EMPTY, type VirtQueue } from "../virtio/virtqueue.ts";
import { VIRTIO_VSOCK_HDR_SIZE } from "./constants.ts";

/** Most extra chains one read fills (with 4 KiB buffers: 16 = 64 KiB, one max packet's worth x 4). */
export const RX_BATCH_MAX_CHAINS = 63;

/** Extra rx chains lent to the connection filling a buffer (see module doc). */
export interface RxChainSource {
  /** Another chain with room for payload, or null (ring empty or exhausted). */
  take(): DescChain | null;
  /** Gives back the last `n` chains taken (they were not filled). */
  giveBack(n: number): void;
  /** A taken chain was filled with a packet of `len` bytes. */
  complete(chain: DescChain, len: number): void;
}

export class RxBatch implements RxChainSource {
  readonly #chains: DescChain[] = [];
  #queue: VirtQueue | null = null;
  #taken = 0;
  readonly #heads = new Uint16Array(RX_BATCH_MAX_CHAINS);
  readonly #lens = new Uint32Array(RX_BATCH_MAX_CHAINS);
  #done = 0;

  constructor(chainCapacity: number) {
    for (let i = 0; i < RX_BATCH_MAX_CHAINS; i++) this.#chains.push(new DescChain(chainCapacity));
  }

  /** Starts lending chains of `q` for one packet fill. */
  begin(q: VirtQueue): void {
    this.#queue = q;
    this.#taken = 0;
    this.#done = 0;
  }

  take(): DescChain | null {
    const q = this.#queue;
    if (q === null || this.#taken >= RX_BATCH_MAX_CHAINS) return null;
    const c = this.#chains[this.#taken];
    const r = q.pop(c);
    if (r === POP_EMPTY) return null;
    if (r !== POP_CHAIN || c.readableCount !== 0 || c.writableLen <= VIRTIO_VSOCK_HDR_SIZE) {
      q.unpop(); // invalid or not for data: the RX loop deals with it in its turn
      return null;
    }
    this.#taken++;
    return c;
  }

  giveBack(n: number): void {
    for (let i = 0; i < n; i++) this.#queue!.unpop();
    this.#taken -= n;
  }

  complete(chain: DescChain, len: number): void {
    this.#heads[this.#done] = chain.head;
    this.#lens[this.#done] = len;
    this.#done++;
  }

  /** Pushes the filled extra chains to the used ring (after the first chain); their count. */
  flushUsed(): number {
    const q = this.#queue!;
    const n = this.#done;
    for (let i = 0; i < n; i++) q.pushUsed(this.#heads[i], this.#lens[i]);
    this.#done = 0;
    this.#taken = 0;
    this.#queue = null;
    return n;
  }
}
