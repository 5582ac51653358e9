/**
 * Sibling VMs: guests served by one daemon reach each other by CID when their
 * devices share a group (`--groups`, as in vhost-device-vsock).
 *
 * The back end acts as a switch between the two guests' virtqueues: a packet a
 * guest sends to a sibling's CID is copied into the sibling device's inbound
 * queue and delivered, header unchanged, into the sibling's RX ring. The two
 * guest drivers run the connection state machine and the credit flow between
 * themselves, exactly as two Linux guests on one host would; the switch only
 * splits an RW payload across the receiver's buffers when they are smaller.
 *
 * Memory stays bounded however the guests behave: each device's inbound queue
 * holds at most MAX_SIBLING_QUEUE_BYTES / MAX_SIBLING_QUEUE_PACKETS; a packet
 * that does not fit is refused and the sender gets an RST for that flow (a
 * guest that honours credit never hits the limit).
 *
 * The hub belongs to one reactor, so no locking is needed. VMs served by other worker
 * processes (`--workers`) are registered too, as endpoints whose `acceptFromSibling` writes
 * into a shared-memory ring towards that worker (`../sibling_links.ts`); the muxer cannot
 * tell the difference.
 */
import type { PacketHeader } from "./packet.ts";

/** Bytes (headers + payload) a device may hold for its guest from siblings. */
export const MAX_SIBLING_QUEUE_BYTES = 8 << 20;
/** Packets a device may hold for its guest from siblings. */
export const MAX_SIBLING_QUEUE_PACKETS = 8192;

/** A packet in flight between two guests: header fields and a copy of the payload. */
export interface SiblingPacket {
  srcCid: number;
  dstCid: number;
  srcPort: number;
  dstPort: number;
  type: number;
  op: number;
  flags: number;
  bufAlloc: number;
  fwdCnt: number;
  payload: Uint8Array | null;
  /** payload bytes already delivered (an RW split across receiver buffers) */
  offset: number;
}

/** What a device offers the hub. */
export interface SiblingEndpoint {
  readonly guestCid: number;
  readonly groups: readonly string[];
  /** queue a packet for this device's guest; false if the queue is full */
  acceptFromSibling(p: SiblingPacket): boolean;
}

export class SiblingHub {
  readonly #byCid = new Map<number, SiblingEndpoint>();

  register(e: SiblingEndpoint): void {
    this.#byCid.set(e.guestCid, e);
  }

  unregister(e: SiblingEndpoint): void {
    if (this.#byCid.get(e.guestCid) === e) this.#byCid.delete(e.guestCid);
  }

  /** The endpoint registered for `cid`, if any. */
  lookup(cid: number): SiblingEndpoint | undefined {
    return this.#byCid.get(cid);
  }

  /** The sibling `to` if it shares a group with `from`. */
  route(from: SiblingEndpoint, toCid: number): SiblingEndpoint | undefined {
    const to = this.#byCid.get(toCid);
    if (to === undefined || to === from) return undefined;
    return from.groups.some((g) => to.groups.includes(g)) ? to : undefined;
  }

  /** Copies a guest's packet (header + payload) for delivery to a sibling. */
  static packet(h: PacketHeader, payload: Uint8Array | null): SiblingPacket {
    return {
      srcCid: h.srcCid,
      dstCid: h.dstCid,
      srcPort: h.srcPort,
      dstPort: h.dstPort,
      type: h.type,
      op: h.op,
      flags: h.flags,
      bufAlloc: h.bufAlloc,
      fwdCnt: h.fwdCnt,
      payload,
      offset: 0,
    };
  }
}
