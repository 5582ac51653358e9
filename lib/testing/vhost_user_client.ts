/**
 * The typed requests of a vhost-user front end (`docs/interop/vhost-user.rst`, "Front-end
 * message types"), one method per message, over a `VhostUserChannel`.
 *
 * - `request()`: one message out (encoded with `lib/vhost_user/messages.ts`, recorded in
 *   `trace`) and, when the protocol says one comes back (`ALWAYS_REPLIED_REQUESTS`,
 *   SET_LOG_BASE under LOG_SHMFD, NEED_REPLY under REPLY_ACK), its reply in.
 * - typed helpers (`getFeatures`, `setVringAddr`, ...) encode with the back end's codec,
 *   translate guest-physical ring addresses to front-end virtual addresses (the user
 *   addresses of the guest RAM mappings), and throw when a REPLY_ACK reports failure.
 *
 * The client also owns the VMM's per-queue kick and call eventfds (its ioeventfds and
 * irqfds, one each per vsock virtqueue), which the ring helpers send by default. Which
 * messages to send when is the business of the VMM profiles (`front_end.ts`).
 */

import { close, eventFd } from "../../ffi/mod.ts";
import {
  CodecError,
  decodeConfig,
  decodeU64,
  decodeVringState,
  encodeConfig,
  encodeDeviceState,
  encodeLog,
  encodeMemoryTable,
  encodeRequest,
  encodeSingleMemoryRegion,
  encodeStatus,
  encodeU64,
  encodeVringAddr,
  encodeVringFd,
  encodeVringState,
  type MemoryRegion,
  requestFlags,
  type VringAddr,
} from "../vhost_user/messages.ts";
import {
  ALWAYS_REPLIED_REQUESTS,
  requestName,
  VHOST_MEMORY_BASELINE_NREGIONS,
  VHOST_TRANSFER_STATE_PHASE_STOPPED,
  VHOST_USER_DEVICE_STATE_ERROR_MASK,
  VHOST_USER_DEVICE_STATE_NOFD_MASK,
  VHOST_USER_F_PROTOCOL_FEATURES_MASK,
  VHOST_VRING_F_LOG,
  VhostUserProtocolFeatureMask as PF,
  VhostUserRequest as R,
} from "../vhost_user/protocol.ts";
import { PACKED_EVENT_SIZE, packedDescRingSize } from "../virtio/packed_layout.ts";
import { availRingSize, descTableSize, usedRingSize } from "../virtio/split_layout.ts";
import { VSOCK_VQ_COUNT } from "../vsock/constants.ts";
import { createDirtyLog, type DirtyLog } from "./dirty_log.ts";
import type { GuestRam, GuestRamRegion } from "./guest_ram.ts";
import { VhostUserChannel, VhostUserError, type VhostUserReply } from "./vhost_user_channel.ts";

const EMPTY = new Uint8Array(0);

/** One message the front end sent (see `VhostUserFrontEnd.trace`). */
export interface TraceEntry {
  readonly request: number;
  /** spec name without prefix, e.g. "SET_VRING_KICK" */
  readonly name: string;
  readonly flags: number;
  readonly payload: Uint8Array;
  /** number of fds attached */
  readonly fds: number;
}

/** Options of the low-level `request`. */
export interface RequestOptions {
  /** set NEED_REPLY in the header (the back end acks only when REPLY_ACK was negotiated) */
  readonly needReply?: boolean;
  /**
   * read a reply: default true for requests that always get one, and for NEED_REPLY
   * requests once REPLY_ACK is negotiated
   */
  readonly expectReply?: boolean;
  /** reply timeout (default: the front end's `replyTimeoutMs`) */
  readonly timeoutMs?: number;
}

/** Options of the typed helpers that have no reply of their own. */
export interface SendOptions {
  /**
   * set NEED_REPLY and (with REPLY_ACK negotiated) wait for the ack, throwing on a non-zero
   * one. Default: the front end's `needReplyAll` option.
   */
  readonly needReply?: boolean;
}

/** SET_DEVICE_STATE_FD's reply, decoded. */
export interface DeviceStateFdReply {
  /** bits 0-7 of the reply (0 = success) */
  readonly error: number;
  /** the back end's own fd to use instead of ours (reply bit 8 clear), or null */
  readonly backendFd: number | null;
}

/** Options of the client (part of `FrontEndOptions`). */
export interface ClientOptions {
  /** use VHOST_USER_F_PROTOCOL_FEATURES when offered (default true) */
  readonly protocolFeatures?: boolean;
  /** set NEED_REPLY on every request without its own reply and wait for the ack */
  readonly needReplyAll?: boolean;
  /** how long to wait for each reply (default 5000) */
  readonly replyTimeoutMs?: number;
}

/** Typed vhost-user requests over one connection. See the module doc. */
export class VhostUserClient {
  /** guest RAM (shared or owned, see `FrontEndOptions.memory`) */
  readonly memory: GuestRam;
  /** every message sent, in order */
  readonly trace: TraceEntry[] = [];
  /** per virtqueue (0 rx, 1 tx, 2 event): the eventfd the guest "writes" to notify */
  readonly kickFds: readonly number[];
  /** per virtqueue: the eventfd the back end writes to interrupt the guest */
  readonly callFds: readonly number[];

  /** GET_FEATURES reply (0 before init) */
  backendFeatures = 0n;
  /** GET_PROTOCOL_FEATURES reply (0 if never asked) */
  backendProtocolFeatures = 0n;
  /** the value of the last SET_PROTOCOL_FEATURES */
  ackedProtocolFeatures = 0n;
  /** the value of the last SET_FEATURES, null before the first */
  ackedFeatures: bigint | null = null;
  /** GET_QUEUE_NUM reply, null if never asked */
  queueNum: number | null = null;
  /** GET_MAX_MEM_SLOTS reply, null if never asked */
  maxMemSlots: number | null = null;

  readonly #clientOpts: ClientOptions;
  readonly #channel: VhostUserChannel;
  #closed = false;
  /** regions the back end was told about (SET_MEM_TABLE / ADD_MEM_REG) */
  readonly #announced = new Set<GuestRamRegion>();
  #dirtyLog: DirtyLog | null = null;

  /** Takes ownership of the connected socket `sock`; creates the kick and call eventfds. */
  protected constructor(sock: number, memory: GuestRam, opts: ClientOptions) {
    this.#channel = new VhostUserChannel(sock, opts.replyTimeoutMs ?? 5000);
    this.#clientOpts = opts;
    this.memory = memory;
    const kicks: number[] = [];
    const calls: number[] = [];
    for (let i = 0; i < VSOCK_VQ_COUNT; i++) {
      kicks.push(eventFd());
      calls.push(eventFd());
    }
    this.kickFds = kicks;
    this.callFds = calls;
  }

  /** The socket fd (for polling for HUP); -1 once closed. */
  get socketFd(): number {
    return this.#channel.fd;
  }

  /** Whether `close()` was called. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Replies read so far. */
  protected get repliesReceived(): number {
    return this.#channel.repliesReceived;
  }

  /** Whether VHOST_USER_F_PROTOCOL_FEATURES is in use (offered, and not refused by options). */
  get protocolFeaturesOn(): boolean {
    return (this.backendFeatures & VHOST_USER_F_PROTOCOL_FEATURES_MASK) !== 0n &&
      this.#clientOpts.protocolFeatures !== false;
  }

  /** Whether protocol feature `mask` (a `VhostUserProtocolFeatureMask` value) was acked. */
  hasProtocolFeature(mask: bigint): boolean {
    return (this.ackedProtocolFeatures & mask) !== 0n;
  }

  /** The features value the VMM sends in SET_FEATURES for the guest's `driverFeatures`. */
  backendFeaturesFor(driverFeatures: bigint): bigint {
    let f = driverFeatures;
    if (this.protocolFeaturesOn) f |= VHOST_USER_F_PROTOCOL_FEATURES_MASK;
    return f;
  }

  // -------------------------------------------------------------------------------------
  // Low level
  // -------------------------------------------------------------------------------------

  /**
   * Sends one request and, when a reply is due (see `RequestOptions.expectReply`), reads it.
   * Returns the reply or null. Throws VhostUserError on a send failure, a timeout, EOF, or a
   * reply that is not a well-formed reply to `req`.
   */
  request(
    req: number,
    payload: Uint8Array = EMPTY,
    fds: readonly number[] = [],
    opts: RequestOptions = {},
  ): VhostUserReply | null {
    this.checkOpen();
    const needReply = opts.needReply ?? false;
    const msg = encodeRequest(req, payload, needReply);
    const flags = requestFlags(needReply);
    this.trace.push({ request: req, name: requestName(req), flags, payload, fds: fds.length });
    this.#channel.send(msg, fds, req);
    const expect = opts.expectReply ??
      (ALWAYS_REPLIED_REQUESTS.has(req) ||
        (req === R.SET_LOG_BASE && this.hasProtocolFeature(PF.LOG_SHMFD)) ||
        (needReply && this.hasProtocolFeature(PF.REPLY_ACK)));
    if (!expect) return null;
    return this.#channel.readReply(req, opts.timeoutMs ?? this.#channel.replyTimeoutMs);
  }

  /** Whether bytes the front end did not ask for are waiting on the socket (a stray reply). */
  hasPendingInput(): boolean {
    this.checkOpen();
    return this.#channel.hasPendingInput();
  }

  /** Sends a request without a reply of its own; with NEED_REPLY + REPLY_ACK checks the ack. */
  #set(req: number, payload: Uint8Array, fds: readonly number[], opts: SendOptions = {}): void {
    const needReply = opts.needReply ??
      (this.#clientOpts.needReplyAll === true && this.hasProtocolFeature(PF.REPLY_ACK));
    const reply = this.request(req, payload, fds, { needReply });
    if (reply !== null) this.#checkAck(req, reply);
  }

  #checkAck(req: number, reply: VhostUserReply): void {
    for (const fd of reply.fds) close(fd);
    const v = decodeU64(reply.payload);
    if (v instanceof CodecError) throw new VhostUserError(`${requestName(req)}: ack: ${v.message}`);
    if (v !== 0n) throw new VhostUserError(`${requestName(req)}: the back end NACKed (${v})`);
  }

  #u64Reply(req: number, payload: Uint8Array = EMPTY): bigint {
    const reply = this.request(req, payload, [], { expectReply: true })!;
    for (const fd of reply.fds) close(fd);
    const v = decodeU64(reply.payload);
    if (v instanceof CodecError) throw new VhostUserError(`${requestName(req)}: ${v.message}`);
    return v;
  }

  // -------------------------------------------------------------------------------------
  // Typed helpers, one per message
  // -------------------------------------------------------------------------------------

  /** GET_FEATURES: the virtio features the back end offers (also stored in backendFeatures). */
  getFeatures(): bigint {
    this.backendFeatures = this.#u64Reply(R.GET_FEATURES);
    return this.backendFeatures;
  }

  /** SET_FEATURES. */
  setFeatures(features: bigint, opts?: SendOptions): void {
    this.#set(R.SET_FEATURES, encodeU64(features), [], opts);
    this.ackedFeatures = features;
  }

  /** GET_PROTOCOL_FEATURES (also stored in backendProtocolFeatures). */
  getProtocolFeatures(): bigint {
    this.backendProtocolFeatures = this.#u64Reply(R.GET_PROTOCOL_FEATURES);
    return this.backendProtocolFeatures;
  }

  /** SET_PROTOCOL_FEATURES (also stored in ackedProtocolFeatures). */
  setProtocolFeatures(features: bigint, opts?: SendOptions): void {
    // Record first: REPLY_ACK applies to this very message's NEED_REPLY once acked.
    this.ackedProtocolFeatures = features;
    this.#set(R.SET_PROTOCOL_FEATURES, encodeU64(features), [], opts);
  }

  /** SET_OWNER. */
  setOwner(opts?: SendOptions): void {
    this.#set(R.SET_OWNER, EMPTY, [], opts);
  }

  /** RESET_OWNER (deprecated by the spec; for tests). */
  resetOwner(opts?: SendOptions): void {
    this.#set(R.RESET_OWNER, EMPTY, [], opts);
  }

  /** GET_QUEUE_NUM (also stored in queueNum). */
  getQueueNum(): number {
    const v = this.#u64Reply(R.GET_QUEUE_NUM);
    this.queueNum = Number(BigInt.asUintN(32, v));
    return this.queueNum;
  }

  /** GET_MAX_MEM_SLOTS (also stored in maxMemSlots). */
  getMaxMemSlots(): number {
    const v = this.#u64Reply(R.GET_MAX_MEM_SLOTS);
    this.maxMemSlots = Number(BigInt.asUintN(32, v));
    return this.maxMemSlots;
  }

  /** The vhost-user description of a region (user address = our mapping's address). */
  regionDescription(region: GuestRamRegion, mmapOffset = region.mmapOffset): MemoryRegion {
    return {
      guestAddr: region.gpa,
      size: region.size,
      userAddr: region.hostAddr,
      mmapOffset,
    };
  }

  /** SET_MEM_TABLE with `regions` (default: all of guest RAM), one fd each. */
  setMemTable(regions: readonly GuestRamRegion[] = this.memory.regions, opts?: SendOptions): void {
    if (regions.length > VHOST_MEMORY_BASELINE_NREGIONS) {
      throw new RangeError(
        `SET_MEM_TABLE carries at most ${VHOST_MEMORY_BASELINE_NREGIONS} regions; use ADD_MEM_REG`,
      );
    }
    const payload = encodeMemoryTable({ regions: regions.map((r) => this.regionDescription(r)) });
    this.#set(R.SET_MEM_TABLE, payload, regions.map((r) => r.fd), opts);
    this.#announced.clear();
    for (const r of regions) this.#announced.add(r);
  }

  /** ADD_MEM_REG for one region (with its fd). */
  addMemReg(region: GuestRamRegion, opts?: SendOptions): void {
    this.#set(R.ADD_MEM_REG, encodeSingleMemoryRegion(this.regionDescription(region)), [
      region.fd,
    ], opts);
    this.#announced.add(region);
  }

  /** REM_MEM_REG for one region (no fd; mmap_offset 0 as QEMU sends it). */
  remMemReg(region: GuestRamRegion, opts?: SendOptions): void {
    this.#set(R.REM_MEM_REG, encodeSingleMemoryRegion(this.regionDescription(region, 0)), [], opts);
    this.#announced.delete(region);
  }

  /** Regions the back end was told about. */
  get announcedRegions(): readonly GuestRamRegion[] {
    return [...this.#announced];
  }

  /** SET_VRING_NUM. */
  setVringNum(index: number, num: number, opts?: SendOptions): void {
    this.#set(R.SET_VRING_NUM, encodeVringState({ index, num }), [], opts);
  }

  /**
   * SET_VRING_ADDR from guest-physical ring addresses (translated to front-end virtual
   * addresses). `log` sets VHOST_VRING_F_LOG with the used ring as log address, as QEMU does
   * while logging dirty pages.
   */
  setVringAddr(
    index: number,
    ring: { descGpa: number; availGpa: number; usedGpa: number; size: number; packed?: boolean },
    opts: SendOptions & { log?: boolean } = {},
  ): void {
    const m = this.memory;
    const packed = ring.packed ?? false;
    this.setVringAddrRaw({
      index,
      flags: opts.log ? 1 << VHOST_VRING_F_LOG : 0,
      descUser: m.gpaToUser(
        ring.descGpa,
        packed ? packedDescRingSize(ring.size) : descTableSize(ring.size),
      ),
      availUser: m.gpaToUser(
        ring.availGpa,
        packed ? PACKED_EVENT_SIZE : availRingSize(ring.size, false),
      ),
      usedUser: m.gpaToUser(
        ring.usedGpa,
        packed ? PACKED_EVENT_SIZE : usedRingSize(ring.size, false),
      ),
      logGuestAddr: opts.log ? BigInt(ring.usedGpa) : 0n,
    }, opts);
  }

  /** SET_VRING_ADDR verbatim (user addresses; for malformed-address tests). */
  setVringAddrRaw(addr: VringAddr, opts?: SendOptions): void {
    this.#set(R.SET_VRING_ADDR, encodeVringAddr(addr), [], opts);
  }

  /** SET_VRING_BASE. */
  setVringBase(index: number, base: number, opts?: SendOptions): void {
    this.#set(R.SET_VRING_BASE, encodeVringState({ index, num: base }), [], opts);
  }

  /** GET_VRING_BASE: stops the ring; returns the next avail index the back end would process. */
  getVringBase(index: number): number {
    const reply = this.request(R.GET_VRING_BASE, encodeVringState({ index, num: 0 }), [], {
      expectReply: true,
    })!;
    for (const fd of reply.fds) close(fd);
    const s = decodeVringState(reply.payload);
    if (s instanceof CodecError) throw new VhostUserError(`GET_VRING_BASE: ${s.message}`);
    if (s.index !== index) {
      throw new VhostUserError(`GET_VRING_BASE: asked for vring ${index}, reply names ${s.index}`);
    }
    return s.num;
  }

  /** SET_VRING_KICK with `fd` (default: this front end's kick eventfd), or "nofd" (bit 8). */
  setVringKick(index: number, fd: number | "nofd" = this.kickFds[index], opts?: SendOptions): void {
    this.#setVringFd(R.SET_VRING_KICK, index, fd, opts);
  }

  /** SET_VRING_CALL with `fd` (default: this front end's call eventfd), or "nofd". */
  setVringCall(index: number, fd: number | "nofd" = this.callFds[index], opts?: SendOptions): void {
    this.#setVringFd(R.SET_VRING_CALL, index, fd, opts);
  }

  /** SET_VRING_ERR with `fd` (an eventfd of the caller's), or "nofd". */
  setVringErr(index: number, fd: number | "nofd", opts?: SendOptions): void {
    this.#setVringFd(R.SET_VRING_ERR, index, fd, opts);
  }

  #setVringFd(req: number, index: number, fd: number | "nofd", opts?: SendOptions): void {
    if (fd !== "nofd" && !(Number.isInteger(fd) && fd >= 0)) {
      throw new RangeError(`${requestName(req)}: no fd for vring ${index}`);
    }
    const noFd = fd === "nofd";
    this.#set(req, encodeVringFd({ index, noFd }), noFd ? [] : [fd], opts);
  }

  /** SET_VRING_ENABLE. */
  setVringEnable(index: number, enable: boolean, opts?: SendOptions): void {
    this.#set(R.SET_VRING_ENABLE, encodeVringState({ index, num: enable ? 1 : 0 }), [], opts);
  }

  /** VRING_KICK (in-band kick; needs INBAND_NOTIFICATIONS, which is rarely offered). */
  vringKickInBand(index: number, opts?: SendOptions): void {
    this.#set(R.VRING_KICK, encodeVringState({ index, num: 0 }), [], opts);
  }

  /**
   * GET_CONFIG for [offset, offset+size). Returns the bytes, or null when the back end
   * signals failure (an empty reply or a zero size). Throws when the reply names another
   * range.
   */
  getConfig(offset: number, size: number, flags = 0): Uint8Array | null {
    const payload = encodeConfig({ offset, size, flags, payload: new Uint8Array(size) });
    const reply = this.request(R.GET_CONFIG, payload, [], { expectReply: true })!;
    for (const fd of reply.fds) close(fd);
    if (reply.payload.length === 0) return null;
    const c = decodeConfig(reply.payload);
    if (c instanceof CodecError) throw new VhostUserError(`GET_CONFIG: ${c.message}`);
    if (c.size === 0) return null;
    if (c.offset !== offset || c.size !== size) {
      throw new VhostUserError(
        `GET_CONFIG: asked for [${offset}, +${size}), reply has [${c.offset}, +${c.size})`,
      );
    }
    return c.payload;
  }

  /** SET_CONFIG (the vsock config space is read-only: a good back end NACKs this). */
  setConfig(offset: number, data: Uint8Array, flags = 0, opts?: SendOptions): void {
    this.#set(
      R.SET_CONFIG,
      encodeConfig({ offset, size: data.length, flags, payload: data }),
      [],
      opts,
    );
  }

  /** RESET_DEVICE. */
  resetDevice(opts?: SendOptions): void {
    this.#set(R.RESET_DEVICE, EMPTY, [], opts);
  }

  /** SET_STATUS. */
  setStatus(status: number, opts?: SendOptions): void {
    this.#set(R.SET_STATUS, encodeStatus(status), [], opts);
  }

  /** GET_STATUS. */
  getStatus(): number {
    return Number(BigInt.asUintN(8, this.#u64Reply(R.GET_STATUS)));
  }

  /**
   * SET_LOG_BASE with a fresh memfd log covering all guest RAM (one bit per 4 KiB page,
   * rounded up to whole u64s like QEMU's log chunks). Returns a view of the log; the
   * previous log (if any) is closed. The back end replies when LOG_SHMFD was negotiated.
   */
  setLogBase(opts?: { size?: number }): DirtyLog {
    const area = createDirtyLog(this.memory.topGpa, opts?.size);
    try {
      const reply = this.request(
        R.SET_LOG_BASE,
        encodeLog({ mmapSize: area.size, mmapOffset: 0 }),
        [area.fd],
      );
      if (reply !== null) this.#checkAck(R.SET_LOG_BASE, reply);
    } catch (e) {
      area.log.close();
      throw e;
    }
    this.#dirtyLog?.close();
    this.#dirtyLog = area.log;
    return this.#dirtyLog;
  }

  /** Closes the log of the last SET_LOG_BASE, if any. */
  protected closeDirtyLog(): void {
    this.#dirtyLog?.close();
    this.#dirtyLog = null;
  }

  /**
   * SET_DEVICE_STATE_FD(direction, phase) with `fd` (the front end keeps its own copy; close
   * it yourself). Returns the decoded reply; a returned back-end fd is the caller's.
   */
  setDeviceStateFd(
    direction: number,
    fd: number,
    phase = VHOST_TRANSFER_STATE_PHASE_STOPPED,
  ): DeviceStateFdReply {
    const reply = this.request(R.SET_DEVICE_STATE_FD, encodeDeviceState({ direction, phase }), [
      fd,
    ], { expectReply: true })!;
    const v = decodeU64(reply.payload);
    if (v instanceof CodecError) {
      for (const f of reply.fds) close(f);
      throw new VhostUserError(`SET_DEVICE_STATE_FD: ${v.message}`);
    }
    const error = Number(v & BigInt(VHOST_USER_DEVICE_STATE_ERROR_MASK));
    const noFd = (v & BigInt(VHOST_USER_DEVICE_STATE_NOFD_MASK)) !== 0n;
    if (noFd || error !== 0) {
      for (const f of reply.fds) close(f);
      return { error, backendFd: null };
    }
    if (reply.fds.length !== 1) {
      for (const f of reply.fds) close(f);
      throw new VhostUserError(
        `SET_DEVICE_STATE_FD: reply bit 8 clear ("fd returned") but ${reply.fds.length} fds came`,
      );
    }
    return { error, backendFd: reply.fds[0] };
  }

  /** CHECK_DEVICE_STATE: the back end's u64 (0 = the transfer succeeded). */
  checkDeviceState(): bigint {
    return this.#u64Reply(R.CHECK_DEVICE_STATE);
  }

  /** Closes the socket, the kick and call eventfds and the dirty log. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#channel.close();
    for (const fd of [...this.kickFds, ...this.callFds]) close(fd);
    this.closeDirtyLog();
  }

  protected checkOpen(): void {
    if (this.#closed) throw new VhostUserError("the front end is closed");
  }
}
