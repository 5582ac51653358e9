/**
 * The virtio-vsock packet header, `struct virtio_vsock_hdr` (virtio 1.3 "Socket Device",
 * Device Operation): 44 bytes, little endian, in front of every packet on the rx and tx
 * virtqueues, followed by `len` payload bytes.
 *
 * ```
 * off size field      notes
 *   0  8   src_cid    upper 32 bits reserved, zero
 *   8  8   dst_cid    upper 32 bits reserved, zero
 *  16  4   src_port
 *  20  4   dst_port
 *  24  4   len        payload bytes after the header (only RW carries any)
 *  28  2   type       VIRTIO_VSOCK_TYPE_*
 *  30  2   op         VIRTIO_VSOCK_OP_*
 *  32  4   flags      SHUTDOWN_F_* for SHUTDOWN, SEQ_EOM/EOR for SEQPACKET RW
 *  36  4   buf_alloc  sender's receive buffer for this flow (credit, see credit.ts)
 *  40  4   fwd_cnt    payload bytes the sender has consumed (credit)
 * ```
 *
 * `PacketHeader` is a mutable, reusable record: `decodeFrom` / `encodeTo` read and write it
 * in place over a DataView (guest memory or a scratch buffer) and allocate nothing, so one
 * instance serves every packet of a queue. The 64-bit CIDs are kept as two u32 halves
 * (`srcCid` = low half, `srcCidHi` = high half), never as a BigInt: a valid CID has a zero
 * high half, and keeping the halves apart makes decode -> encode exact for any bytes.
 *
 * `validateHeader` checks what a guest-sent (tx queue) header must satisfy before it is
 * routed. It does not judge `type`: the spec requires an RST *reply* to an unknown type,
 * which is the router's business, not a reason to drop the packet.
 */

import type { DescChain } from "../virtio/desc_chain.ts";
import {
  MAX_PKT_PAYLOAD,
  opName,
  typeName,
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_OP_MAX,
  VIRTIO_VSOCK_OP_RST,
  VIRTIO_VSOCK_OP_RW,
} from "./constants.ts";

/** Byte offsets of the header fields. */
export const HDR_OFF_SRC_CID = 0;
export const HDR_OFF_DST_CID = 8;
export const HDR_OFF_SRC_PORT = 16;
export const HDR_OFF_DST_PORT = 20;
export const HDR_OFF_LEN = 24;
export const HDR_OFF_TYPE = 28;
export const HDR_OFF_OP = 30;
export const HDR_OFF_FLAGS = 32;
export const HDR_OFF_BUF_ALLOC = 36;
export const HDR_OFF_FWD_CNT = 40;

/** A decoded `virtio_vsock_hdr`. All fields are plain unsigned integers. */
export class PacketHeader {
  /** Low 32 bits of src_cid (the CID itself when valid). */
  srcCid = 0;
  /** High 32 bits of src_cid; reserved, must be 0. */
  srcCidHi = 0;
  /** Low 32 bits of dst_cid (the CID itself when valid). */
  dstCid = 0;
  /** High 32 bits of dst_cid; reserved, must be 0. */
  dstCidHi = 0;
  srcPort = 0;
  dstPort = 0;
  /** Payload length in bytes (u32). */
  len = 0;
  /** u16, VIRTIO_VSOCK_TYPE_*. */
  type = 0;
  /** u16, VIRTIO_VSOCK_OP_*. */
  op = 0;
  flags = 0;
  bufAlloc = 0;
  fwdCnt = 0;

  /** Zeroes every field (use before filling a header to send). */
  reset(): this {
    this.srcCid = 0;
    this.srcCidHi = 0;
    this.dstCid = 0;
    this.dstCidHi = 0;
    this.srcPort = 0;
    this.dstPort = 0;
    this.len = 0;
    this.type = 0;
    this.op = 0;
    this.flags = 0;
    this.bufAlloc = 0;
    this.fwdCnt = 0;
    return this;
  }

  /** Copies every field of `other` into this header. */
  copyFrom(other: PacketHeader): this {
    this.srcCid = other.srcCid;
    this.srcCidHi = other.srcCidHi;
    this.dstCid = other.dstCid;
    this.dstCidHi = other.dstCidHi;
    this.srcPort = other.srcPort;
    this.dstPort = other.dstPort;
    this.len = other.len;
    this.type = other.type;
    this.op = other.op;
    this.flags = other.flags;
    this.bufAlloc = other.bufAlloc;
    this.fwdCnt = other.fwdCnt;
    return this;
  }

  /**
   * Reads the 44 bytes at `view[off..off+44)`. The caller guarantees they are in bounds
   * (DataView throws RangeError otherwise). Any byte pattern decodes.
   */
  decodeFrom(view: DataView, off: number): this {
    this.srcCid = view.getUint32(off + HDR_OFF_SRC_CID, true);
    this.srcCidHi = view.getUint32(off + HDR_OFF_SRC_CID + 4, true);
    this.dstCid = view.getUint32(off + HDR_OFF_DST_CID, true);
    this.dstCidHi = view.getUint32(off + HDR_OFF_DST_CID + 4, true);
    this.srcPort = view.getUint32(off + HDR_OFF_SRC_PORT, true);
    this.dstPort = view.getUint32(off + HDR_OFF_DST_PORT, true);
    this.len = view.getUint32(off + HDR_OFF_LEN, true);
    this.type = view.getUint16(off + HDR_OFF_TYPE, true);
    this.op = view.getUint16(off + HDR_OFF_OP, true);
    this.flags = view.getUint32(off + HDR_OFF_FLAGS, true);
    this.bufAlloc = view.getUint32(off + HDR_OFF_BUF_ALLOC, true);
    this.fwdCnt = view.getUint32(off + HDR_OFF_FWD_CNT, true);
    return this;
  }

  /**
   * Writes the header to `view[off..off+44)`. Fields are truncated to their wire width
   * (DataView setters wrap modulo 2^32 / 2^16), so keep them in range.
   */
  encodeTo(view: DataView, off: number): void {
    view.setUint32(off + HDR_OFF_SRC_CID, this.srcCid, true);
    view.setUint32(off + HDR_OFF_SRC_CID + 4, this.srcCidHi, true);
    view.setUint32(off + HDR_OFF_DST_CID, this.dstCid, true);
    view.setUint32(off + HDR_OFF_DST_CID + 4, this.dstCidHi, true);
    view.setUint32(off + HDR_OFF_SRC_PORT, this.srcPort, true);
    view.setUint32(off + HDR_OFF_DST_PORT, this.dstPort, true);
    view.setUint32(off + HDR_OFF_LEN, this.len, true);
    view.setUint16(off + HDR_OFF_TYPE, this.type, true);
    view.setUint16(off + HDR_OFF_OP, this.op, true);
    view.setUint32(off + HDR_OFF_FLAGS, this.flags, true);
    view.setUint32(off + HDR_OFF_BUF_ALLOC, this.bufAlloc, true);
    view.setUint32(off + HDR_OFF_FWD_CNT, this.fwdCnt, true);
  }

  /** One-line description for logs (allocates; not for hot paths). */
  describe(): string {
    const cid = (lo: number, hi: number) =>
      hi === 0 ? `${lo}` : `0x${hi.toString(16)}${lo.toString(16).padStart(8, "0")}`;
    return `${opName(this.op)} ${typeName(this.type)} ` +
      `${cid(this.srcCid, this.srcCidHi)}:${this.srcPort} -> ` +
      `${cid(this.dstCid, this.dstCidHi)}:${this.dstPort} len=${this.len} ` +
      `flags=0x${this.flags.toString(16)} buf_alloc=${this.bufAlloc} fwd_cnt=${this.fwdCnt}`;
  }
}

/**
 * A reusable header with its 44-byte wire buffer, to read headers out of and write them
 * into descriptor chains without allocating (one per device, shared by its tx and rx paths).
 */
export class HeaderScratch {
  readonly h: PacketHeader = new PacketHeader();
  readonly bytes: Uint8Array = new Uint8Array(VIRTIO_VSOCK_HDR_SIZE);
  readonly view: DataView = new DataView(this.bytes.buffer);

  /** Decodes the header at the start of the chain's readable part (the caller checked
   * that it holds at least VIRTIO_VSOCK_HDR_SIZE bytes). */
  readFrom(chain: DescChain): PacketHeader {
    chain.readInto(this.bytes, 0);
    return this.h.decodeFrom(this.view, 0);
  }

  /** Encodes `h` at the start of the chain's writable part. */
  writeTo(chain: DescChain): void {
    this.h.encodeTo(this.view, 0);
    chain.writeFrom(this.bytes, 0);
  }
}

/**
 * The RST answering `h` (a packet for no socket: Linux's virtio_transport_reset_no_sock):
 * addresses swapped, same type, no credit.
 */
export function resetReplyFor(h: PacketHeader): PacketHeader {
  const r = new PacketHeader();
  r.srcCid = h.dstCid;
  r.srcCidHi = h.dstCidHi;
  r.dstCid = h.srcCid;
  r.dstCidHi = h.srcCidHi;
  r.srcPort = h.dstPort;
  r.dstPort = h.srcPort;
  r.type = h.type;
  r.op = VIRTIO_VSOCK_OP_RST;
  return r;
}

/** Header size re-exported for codec users. */
export const PACKET_HEADER_SIZE = VIRTIO_VSOCK_HDR_SIZE;

/** Reasons `validateHeader` returns (constant strings: rejecting allocates nothing). */
export const HeaderError = {
  SRC_CID: "src_cid is not the guest's CID",
  SRC_CID_HIGH: "src_cid has non-zero upper 32 bits",
  DST_CID_HIGH: "dst_cid has non-zero upper 32 bits",
  UNKNOWN_OP: "unknown op",
  LEN_TOO_BIG: "len exceeds the maximum packet payload",
  PAYLOAD_ON_CONTROL_OP: "non-zero len on an op other than RW",
  LEN_EXCEEDS_CHAIN: "len exceeds the payload bytes of the descriptor chain",
} as const;

/** One of the `HeaderError` strings. */
export type HeaderErrorReason = typeof HeaderError[keyof typeof HeaderError];

/**
 * Checks a header the guest sent on the tx queue. Returns null when it may be routed, or
 * the reason to drop it:
 * - `src_cid` must be the guest's CID (spec: the driver MUST use guest_cid as source), with
 *   zero upper bits; `dst_cid` must have zero upper bits (spec: reserved and zeroed);
 * - `op` must be one of REQUEST..CREDIT_REQUEST (0 = INVALID is rejected too);
 * - `len` must not exceed MAX_PKT_PAYLOAD, must be 0 unless op is RW, and must fit in the
 *   `chainPayload` bytes that follow the header in the descriptor chain (when given).
 *
 * Unknown `type` values are not rejected here: they need an RST reply (see module doc).
 */
export function validateHeader(
  h: PacketHeader,
  expectedSrcCid: number,
  chainPayload: number = Infinity,
): HeaderErrorReason | null {
  if (h.srcCidHi !== 0) return HeaderError.SRC_CID_HIGH;
  if (h.srcCid !== expectedSrcCid) return HeaderError.SRC_CID;
  if (h.dstCidHi !== 0) return HeaderError.DST_CID_HIGH;
  if (h.op === 0 || h.op > VIRTIO_VSOCK_OP_MAX) return HeaderError.UNKNOWN_OP;
  if (h.len > MAX_PKT_PAYLOAD) return HeaderError.LEN_TOO_BIG;
  if (h.len !== 0 && h.op !== VIRTIO_VSOCK_OP_RW) return HeaderError.PAYLOAD_ON_CONTROL_OP;
  if (h.len > chainPayload) return HeaderError.LEN_EXCEEDS_CHAIN;
  return null;
}
