/**
 * The sibling inbox: packets other VMs of this daemon sent to this device's guest, waiting
 * for its rx buffers.
 *
 * The switch between sibling guests (`sibling_hub.ts`) copies a sender's packet, header
 * fields and payload, into the receiver's inbox; the receiver's RX scheduler delivers it
 * with the header unchanged (the two guest drivers run the connection and credit protocol
 * between themselves). Each sending VM is one flow of the scheduler, so one chatty sibling
 * cannot starve the others or the host's connections. A stream or seqpacket RW payload
 * larger than the receiver's buffer is split across several buffers, each packet carrying
 * its part's `len`; for seqpacket only the last part keeps the EOM/EOR flags, so message
 * boundaries survive. A datagram is never split: one that does not fit the buffer in hand
 * is dropped and counted (`dropped`).
 *
 * The inbox is bounded (MAX_SIBLING_QUEUE_BYTES / MAX_SIBLING_QUEUE_PACKETS over all
 * senders): a packet that does not fit is refused, and the sender's device answers its
 * guest with an RST.
 */
import type { DescChain } from "../virtio/desc_chain.ts";
import {
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_SEQ_EOM,
  VIRTIO_VSOCK_SEQ_EOR,
  VIRTIO_VSOCK_TYPE_DGRAM,
  VIRTIO_VSOCK_TYPE_SEQPACKET,
} from "./constants.ts";
import type { HeaderScratch } from "./packet.ts";
import type { RxFlow } from "./rx_scheduler.ts";
import {
  MAX_SIBLING_QUEUE_BYTES,
  MAX_SIBLING_QUEUE_PACKETS,
  type SiblingPacket,
} from "./sibling_hub.ts";

/** The packets of one sending VM: one flow of the RX scheduler. */
class SiblingFlow implements RxFlow {
  inRxQueue = false;
  deficit = 0;
  readonly weight = 1;
  #queue: SiblingPacket[] = [];
  #head = 0;

  constructor(readonly inbox: SiblingInbox) {}

  get done(): boolean {
    return this.#head >= this.#queue.length;
  }

  hasRxWork(): boolean {
    return !this.done;
  }

  push(p: SiblingPacket): void {
    this.#queue.push(p);
  }

  canSendInto(room: number): boolean {
    const p = this.#queue[this.#head];
    if (p === undefined) return false;
    const left = (p.payload?.length ?? 0) - p.offset;
    return left === 0 || room > 0 || p.type === VIRTIO_VSOCK_TYPE_DGRAM;
  }

  fillRx(chain: DescChain): number {
    const p = this.#queue[this.#head];
    const total = p.payload?.length ?? 0;
    const room = chain.writableLen - VIRTIO_VSOCK_HDR_SIZE;
    if (p.type === VIRTIO_VSOCK_TYPE_DGRAM && total > room) {
      this.inbox.dropped++;
      this.#shift(total);
      return -1;
    }
    const n = Math.min(total - p.offset, room);
    if (n > 0) chain.writeFrom(p.payload!.subarray(p.offset, p.offset + n), VIRTIO_VSOCK_HDR_SIZE);
    const last = p.offset + n >= total;
    const scratch = this.inbox.scratch;
    const h = scratch.h;
    h.reset();
    h.srcCid = p.srcCid;
    h.dstCid = this.inbox.guestCid;
    h.srcPort = p.srcPort;
    h.dstPort = p.dstPort;
    h.len = n;
    h.type = p.type;
    h.op = p.op;
    h.flags = last || p.type !== VIRTIO_VSOCK_TYPE_SEQPACKET
      ? p.flags
      : p.flags & ~(VIRTIO_VSOCK_SEQ_EOM | VIRTIO_VSOCK_SEQ_EOR);
    h.bufAlloc = p.bufAlloc;
    h.fwdCnt = p.fwdCnt;
    scratch.writeTo(chain);
    p.offset += n;
    if (last) this.#shift(total);
    return VIRTIO_VSOCK_HDR_SIZE + n;
  }

  #shift(total: number): void {
    this.inbox.release(VIRTIO_VSOCK_HDR_SIZE + total);
    this.#queue[this.#head++] = undefined as unknown as SiblingPacket;
    if (this.#head === this.#queue.length) this.clear();
  }

  clear(): void {
    this.#queue = [];
    this.#head = 0;
  }
}

export class SiblingInbox {
  readonly #flows = new Map<number, SiblingFlow>();
  #bytes = 0;
  #packets = 0;
  /** datagrams dropped because they did not fit the guest's buffer */
  dropped = 0;

  constructor(
    readonly guestCid: number,
    readonly scratch: HeaderScratch,
    /** puts a flow that has packets into the RX scheduler */
    readonly schedule: (f: RxFlow) => void,
  ) {}

  /** Queues `p`; false when the inbox is full. */
  accept(p: SiblingPacket): boolean {
    const size = VIRTIO_VSOCK_HDR_SIZE + (p.payload?.length ?? 0);
    if (
      this.#packets >= MAX_SIBLING_QUEUE_PACKETS || this.#bytes + size > MAX_SIBLING_QUEUE_BYTES
    ) {
      return false;
    }
    let f = this.#flows.get(p.srcCid);
    if (f === undefined) {
      f = new SiblingFlow(this);
      this.#flows.set(p.srcCid, f);
    }
    f.push(p);
    this.#bytes += size;
    this.#packets++;
    this.schedule(f);
    return true;
  }

  /** A packet of `size` bytes left the inbox. */
  release(size: number): void {
    this.#bytes -= size;
    this.#packets--;
  }

  /** Drops every queued packet. */
  clear(): void {
    for (const f of this.#flows.values()) f.clear();
    this.#flows.clear();
    this.#bytes = 0;
    this.#packets = 0;
  }
}
