/**
 * Fault injection for race and robustness tests of a vhost-user vsock back end. Each hook
 * reproduces something a real VMM or guest may do, or a malicious one would:
 *
 * - `bootKickBeforeEnable`: the guest posts buffers and kicks after SET_VRING_KICK but before
 *   SET_VRING_ENABLE ("never drop a kick": the kick must be remembered, not dropped);
 * - `stopRings` / `restartRings`: GET_VRING_BASE on every ring mid-transfer, then
 *   SET_VRING_BASE / SET_VRING_ADDR / SET_VRING_KICK at the same addresses (no guest memory
 *   may be touched in between; queued work must resume without a new kick);
 * - `starveRx` / `refillRx`: the guest stops re-posting rx buffers, then adds them back,
 *   optionally without a kick, like a guest that saw notifications off ("enable notification,
 *   then re-check": the device must re-check the avail index after enabling notifications);
 * - `writeRawChain` and the `malformed*` builders: descriptor chains a Linux guest never
 *   writes (addresses outside RAM or >= 2^53, loops, nested or empty indirect tables,
 *   wrong-direction buffers), in the layout of the guest's rings (split or packed; a packed
 *   ring has no `next` links, so no loops);
 * - `sendRawPacket` / `sendPacketAt`: arbitrary headers (spoofed src_cid, unknown type or op,
 *   len larger than the payload) and packets laid out across adjacent RAM regions;
 * - `disconnect` / `reconnect`: the VMM's vhost-user connection drops and comes back.
 */

import { VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED } from "../virtio/packed_layout.ts";
import {
  descTableSize,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_DESC_SIZE,
  writeDescriptor,
} from "../virtio/split_layout.ts";
import {
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_TYPE_STREAM,
  VSOCK_HOST_CID,
  VSOCK_VQ_TX,
} from "../vsock/constants.ts";
import { PacketHeader } from "../vsock/packet.ts";
import { writePackedDescriptor } from "../virtio/packed_layout.ts";
import { type FrontEndOptions, VhostUserFrontEnd } from "./front_end.ts";
import { type RawDescriptor, VsockGuest, type VsockGuestOptions } from "./guest_driver.ts";

/** Header fields for `sendRawPacket`; anything omitted takes the default noted. */
export interface RawHeaderFields {
  /** default: the guest's CID */
  readonly srcCid?: number;
  /** upper half of src_cid (default 0) */
  readonly srcCidHi?: number;
  /** default 2 (host) */
  readonly dstCid?: number;
  readonly dstCidHi?: number;
  /** default 0 */
  readonly srcPort?: number;
  /** default 0 */
  readonly dstPort?: number;
  /** default: the payload length (see `keepLen`) */
  readonly len?: number;
  /** default STREAM */
  readonly type?: number;
  /** default RW */
  readonly op?: number;
  readonly flags?: number;
  /** default 256 KiB */
  readonly bufAlloc?: number;
  readonly fwdCnt?: number;
}

/** Builds a header from `fields` with the defaults of `RawHeaderFields`. */
export function rawHeader(
  guest: VsockGuest,
  fields: RawHeaderFields,
  payloadLen = 0,
): PacketHeader {
  const h = new PacketHeader();
  h.srcCid = fields.srcCid ?? guest.guestCid;
  h.srcCidHi = fields.srcCidHi ?? 0;
  h.dstCid = fields.dstCid ?? VSOCK_HOST_CID;
  h.dstCidHi = fields.dstCidHi ?? 0;
  h.srcPort = fields.srcPort ?? 0;
  h.dstPort = fields.dstPort ?? 0;
  h.len = fields.len ?? payloadLen;
  h.type = fields.type ?? VIRTIO_VSOCK_TYPE_STREAM;
  h.op = fields.op ?? VIRTIO_VSOCK_OP_RW;
  h.flags = fields.flags ?? 0;
  h.bufAlloc = fields.bufAlloc ?? 256 * 1024;
  h.fwdCnt = fields.fwdCnt ?? 0;
  return h;
}

/** Fault hooks bound to one guest (and its current front end). */
export class Faults {
  constructor(readonly guest: VsockGuest) {}

  /**
   * Boots a guest whose driver posts its rx/event buffers and kicks between SET_VRING_KICK
   * and SET_VRING_ENABLE.
   */
  static bootKickBeforeEnable(
    frontEnd: VhostUserFrontEnd,
    opts: VsockGuestOptions = {},
  ): Promise<VsockGuest> {
    return VsockGuest.boot(frontEnd, { ...opts, kickBeforeEnable: true });
  }

  /** GET_VRING_BASE on every back-end ring (nothing else); returns the bases. */
  stopRings(): number[] {
    this.guest.pump();
    return this.guest.frontEnd.stopRings();
  }

  /**
   * SET_VRING_BASE / SET_VRING_ADDR / SET_VRING_KICK at the same addresses (bases from
   * `stopRings` unless given). No kick follows unless `kick` (the back end must resume queued
   * work by itself).
   */
  restartRings(opts: { bases?: readonly number[]; kick?: boolean } = {}): void {
    const fe = this.guest.frontEnd;
    fe.restartRings(opts.bases);
    if (opts.kick) { for (let i = 0; i < fe.backendQueueCount; i++) this.guest.kickQueue(i); }
    this.guest.pump();
  }

  /** Stops re-posting rx buffers (the device runs out of them as packets arrive). */
  starveRx(): void {
    this.guest.setRxStarved(true);
  }

  /**
   * Resumes re-posting and posts every free rx buffer now; `kick: false` publishes them
   * without notifying (a guest that saw notifications disabled). Returns buffers added.
   */
  refillRx(opts: { kick?: boolean } = {}): number {
    this.guest.setRxStarved(false);
    return this.guest.refillRx(opts);
  }

  /** Puts raw descriptors on a queue (see `VsockGuest.addRawChain`); returns the head. */
  writeRawChain(
    queue: number,
    descs: readonly RawDescriptor[],
    opts: { kick?: boolean } = {},
  ): number {
    return this.guest.addRawChain(queue, descs, opts);
  }

  /**
   * Overwrites descriptor `index` of `queue`'s table verbatim, e.g. to corrupt a buffer the
   * driver already posted (the driver's own bookkeeping is not changed). On a packed ring
   * `index` is a ring slot, and the slot keeps its buffer id and AVAIL/USED bits unless
   * `desc.id` / `desc.availBits` say otherwise.
   */
  writeRawDescriptor(queue: number, index: number, desc: RawDescriptor): void {
    const q = this.guest.queue(queue);
    if (q.packed) {
      const bits = desc.availBits ?? q.readDescFlags(index);
      const availUsed = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED;
      const flags = (desc.flags & ~availUsed) | (bits & availUsed);
      q.writeRawDesc(index, desc.addr, desc.len, desc.id ?? q.readDescId(index), flags);
      return;
    }
    q.writeDesc(index, desc.addr, desc.len, desc.flags, desc.nextRaw ?? desc.next ?? 0);
  }

  /** Allocates `size` bytes of guest RAM (zeroed) for raw chains and tables. */
  allocGuest(size: number, align = 16, region?: number): number {
    return this.guest.memory.alloc(size, align, region);
  }

  /**
   * Writes descriptors (16 bytes each) at `gpa`, e.g. an indirect table, in the layout of the
   * guest's rings (packed: `id`, default 0, and the flags verbatim; no `next`).
   */
  writeDescTable(gpa: number, descs: readonly RawDescriptor[]): void {
    const bytes = new Uint8Array(descTableSize(descs.length));
    const v = new DataView(bytes.buffer);
    const packed = this.guest.packed;
    descs.forEach((d, i) => {
      const off = i * VRING_DESC_SIZE;
      if (packed) return writePackedDescriptor(v, off, d.addr, d.len, d.id ?? 0, d.flags);
      const next = d.nextRaw ?? d.next ?? (i + 1 < descs.length ? i + 1 : 0);
      writeDescriptor(v, off, d.addr, d.len, d.flags, next);
    });
    this.guest.memory.write(gpa, bytes);
  }

  /** A tx chain whose header descriptor points at `addr` (default: far outside RAM). */
  malformedOutOfRange(addr: number | bigint = 2n ** 60n): number {
    return this.writeRawChain(VSOCK_VQ_TX, [{ addr, len: VIRTIO_VSOCK_HDR_SIZE, flags: 0 }]);
  }

  /**
   * A tx chain of two descriptors pointing at each other (a loop). Split rings only: packed
   * descriptors have no `next` link (throws).
   */
  malformedLoop(): number {
    if (this.guest.packed) {
      throw new Error("malformedLoop: a packed ring has no next links, so no loop to write");
    }
    const hdr = this.#validHeaderBuffer();
    return this.writeRawChain(VSOCK_VQ_TX, [
      { addr: hdr, len: VIRTIO_VSOCK_HDR_SIZE, flags: VRING_DESC_F_NEXT, next: 1 },
      { addr: hdr, len: VIRTIO_VSOCK_HDR_SIZE, flags: VRING_DESC_F_NEXT, next: 0 },
    ]);
  }

  /** A tx chain whose indirect table holds another INDIRECT descriptor (forbidden). */
  malformedNestedIndirect(): number {
    const hdr = this.#validHeaderBuffer();
    const inner = this.allocGuest(VRING_DESC_SIZE);
    this.writeDescTable(inner, [{ addr: hdr, len: VIRTIO_VSOCK_HDR_SIZE, flags: 0 }]);
    const outer = this.allocGuest(VRING_DESC_SIZE);
    this.writeDescTable(outer, [{
      addr: inner,
      len: VRING_DESC_SIZE,
      flags: VRING_DESC_F_INDIRECT,
    }]);
    return this.writeRawChain(VSOCK_VQ_TX, [
      { addr: outer, len: VRING_DESC_SIZE, flags: VRING_DESC_F_INDIRECT },
    ]);
  }

  /** A tx chain with an indirect table of length 0. */
  malformedEmptyIndirect(): number {
    const table = this.allocGuest(VRING_DESC_SIZE);
    return this.writeRawChain(VSOCK_VQ_TX, [{ addr: table, len: 0, flags: VRING_DESC_F_INDIRECT }]);
  }

  /** A tx chain whose only descriptor is device-writable (wrong direction for tx). */
  malformedWriteOnlyTx(): number {
    const hdr = this.#validHeaderBuffer();
    return this.writeRawChain(VSOCK_VQ_TX, [{
      addr: hdr,
      len: VIRTIO_VSOCK_HDR_SIZE,
      flags: VRING_DESC_F_WRITE,
    }]);
  }

  /** A guest buffer holding a plausible header (RW to the host, len 0). */
  #validHeaderBuffer(): number {
    const gpa = this.allocGuest(64);
    const h = rawHeader(this.guest, { dstPort: 1, srcPort: 1 });
    const b = new Uint8Array(VIRTIO_VSOCK_HDR_SIZE);
    h.encodeTo(new DataView(b.buffer), 0);
    this.guest.memory.write(gpa, b);
    return gpa;
  }

  /**
   * Sends one packet with arbitrary header fields through the normal tx path (no credit or
   * connection bookkeeping). With `keepLen` the header's `len` is `fields.len` even when it
   * differs from the payload actually chained.
   */
  sendRawPacket(
    fields: RawHeaderFields,
    payload?: Uint8Array,
    opts: { keepLen?: boolean } = {},
  ): void {
    const p = payload ?? new Uint8Array(0);
    this.guest.sendRawPacket(rawHeader(this.guest, fields, p.length), p, {
      keepLen: opts.keepLen ?? fields.len !== undefined,
    });
  }

  /**
   * Sends a packet whose header and payload live at chosen guest addresses (e.g. a payload
   * straddling two adjacent RAM regions): the bytes are written there and a two-descriptor
   * chain (one if no payload) is put on the tx queue. Returns the head (see `rawUsed`).
   */
  sendPacketAt(
    fields: RawHeaderFields,
    payload: Uint8Array,
    at: { headerGpa: number; payloadGpa?: number },
  ): number {
    const h = rawHeader(this.guest, fields, payload.length);
    const hb = new Uint8Array(VIRTIO_VSOCK_HDR_SIZE);
    h.encodeTo(new DataView(hb.buffer), 0);
    this.guest.memory.write(at.headerGpa, hb);
    if (payload.length === 0) {
      return this.writeRawChain(VSOCK_VQ_TX, [{ addr: at.headerGpa, len: hb.length, flags: 0 }]);
    }
    const pg = at.payloadGpa ?? at.headerGpa + VIRTIO_VSOCK_HDR_SIZE;
    this.guest.memory.write(pg, payload);
    return this.writeRawChain(VSOCK_VQ_TX, [
      { addr: at.headerGpa, len: hb.length, flags: VRING_DESC_F_NEXT },
      { addr: pg, len: payload.length, flags: 0 },
    ]);
  }

  /** Drops the vhost-user connection (the guest RAM stays). */
  disconnect(): void {
    this.guest.frontEnd.close({ keepMemory: true });
  }

  /**
   * Connects a new front end to the same socket with the same options and guest RAM, runs
   * its realize sequence and re-attaches the guest (`VsockGuest.attach`). Returns it.
   */
  async reconnect(opts: Partial<FrontEndOptions> = {}): Promise<VhostUserFrontEnd> {
    const old = this.guest.frontEnd;
    if (!old.closed) old.close({ keepMemory: true });
    const fe = await VhostUserFrontEnd.connect(old.socketPath, {
      ...old.options,
      ...opts,
      memory: this.guest.memory,
    });
    if (old.ownsMemory) fe.takeMemoryOwnership();
    this.guest.attach(fe);
    return fe;
  }
}
