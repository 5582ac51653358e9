/**
 * The sibling inbox: packets other VMs of this daemon sent to this device's guest, waiting
 * for its rx buffers.
 *
 * The switch between sibling guests (`sibling_hub.ts`) copies a sender's packet, header
 * fields and payload, into the receiver's inbox; the receiver's rx loop delivers it with
 * the header unchanged (the two guest drivers run the connection and credit protocol
 * between themselves). An RW payload larger than the receiver's buffer is split across
 * several buffers, each packet carrying its part's `len`.
 *
 * The inbox is bounded (MAX_SIBLING_QUEUE_BYTES / MAX_SIBLING_QUEUE_PACKETS): a packet
 * that does not fit is refused, and the sender's device answers its guest with an RST.
 */
import type { DescChain } from "../virtio/desc_chain.ts";
import { VIRTIO_VSOCK_HDR_SIZE } from "./constants.ts";
import type { HeaderScratch } from "./packet.ts";
import {
  MAX_SIBLING_QUEUE_BYTES,
  MAX_SIBLING_QUEUE_PACKETS,
  type SiblingPacket,
} from "./sibling_hub.ts";

export class SiblingInbox {
  #queue: SiblingPacket[] = [];
  #head = 0;
  #bytes = 0;

  /** Packets are waiting. */
  get hasWork(): boolean {
    return this.#head < this.#queue.length;
  }

  /** Queues `p`; false when the inbox is full. */
  accept(p: SiblingPacket): boolean {
    const size = VIRTIO_VSOCK_HDR_SIZE + (p.payload?.length ?? 0);
    const queued = this.#queue.length - this.#head;
    if (queued >= MAX_SIBLING_QUEUE_PACKETS || this.#bytes + size > MAX_SIBLING_QUEUE_BYTES) {
      return false;
    }
    this.#queue.push(p);
    this.#bytes += size;
    return true;
  }

  /**
   * Delivers (part of) the next packet into `chain` for the guest `guestCid`, through
   * `scratch`; returns the bytes written, or -1 if the buffer has no room for payload.
   */
  fill(chain: DescChain, scratch: HeaderScratch, guestCid: number): number {
    const p = this.#queue[this.#head];
    const total = p.payload?.length ?? 0;
    const n = Math.min(total - p.offset, chain.writableLen - VIRTIO_VSOCK_HDR_SIZE);
    if (total > 0 && n <= 0) return -1;
    if (n > 0) chain.writeFrom(p.payload!.subarray(p.offset, p.offset + n), VIRTIO_VSOCK_HDR_SIZE);
    const h = scratch.h;
    h.reset();
    h.srcCid = p.srcCid;
    h.dstCid = guestCid;
    h.srcPort = p.srcPort;
    h.dstPort = p.dstPort;
    h.len = n;
    h.type = p.type;
    h.op = p.op;
    h.flags = p.flags;
    h.bufAlloc = p.bufAlloc;
    h.fwdCnt = p.fwdCnt;
    scratch.writeTo(chain);
    p.offset += n;
    if (p.offset >= total) {
      this.#bytes -= VIRTIO_VSOCK_HDR_SIZE + total;
      this.#queue[this.#head++] = undefined as unknown as SiblingPacket;
      if (this.#head === this.#queue.length) this.clear();
    }
    return VIRTIO_VSOCK_HDR_SIZE + n;
  }

  /** Drops every queued packet. */
  clear(): void {
    this.#queue = [];
    this.#head = 0;
    this.#bytes = 0;
  }
}
