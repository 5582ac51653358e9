/**
 * The connection state machine: one vsock stream between a guest socket and a host Unix
 * socket (virtio 1.3 "Socket Device", 5.10.6.5 - 5.10.6.6).
 *
 * Addressing: the guest side is (guest CID, `peerPort`); the host side is (CID 2,
 * `localPort`). For a guest-initiated connection `localPort` is the port the guest
 * connected to (P, served by `<uds_path>_P`); for a host-initiated one it is a port the
 * muxer allocated (reported to the host app as `OK <localPort>`).
 *
 * Life cycle:
 * - CONNECTING (host-initiated): REQUEST queued or sent to the guest, waiting for its
 *   RESPONSE, an RST, or the connect timeout.
 * - ESTABLISHED: data flows. Each direction is shut down on its own: a SHUTDOWN from the
 *   guest maps to shutdown(2) on the host socket once every byte the guest sent has been
 *   written to it; EOF from the host becomes a SHUTDOWN with the SEND flag only, after the
 *   bytes read before it. When the guest closes both ways while bytes are still queued for a
 *   slow host app, they are delivered first (bounded by CLOSE_DRAIN_TIMEOUT_MS).
 * - CLOSED: both directions finished, or any error: the host socket is closed and the guest
 *   is owed an RST (unless it sent one).
 *
 * Guest -> host: RW payload goes to the host socket with one writev straight from guest
 * memory (consecutive packets of one connection are gathered into one writev by
 * `TxGather`); what the socket does not take waits in `toHost`, bounded by the `buf_alloc`
 * we advertised, and credit returns to the guest as the host app takes bytes.
 *
 * Host -> guest: packets owed to the guest are flags (`pending`), not a queue, so a
 * connection never holds more than one of each kind whatever the guest does; `fillRx`
 * writes the next one into a guest rx buffer (RW data is read with one readv from the host
 * socket straight into guest memory, bounded by the guest's credit).
 *
 * A seqpacket connection is the same state machine with message boundaries kept both ways
 * by `SeqpacketMessages` (seqpacket.ts). A full close of the host socket becomes SHUTDOWN
 * with both flags (see `#hostGone`); windows grow while the host app keeps up (autotune.ts).
 *
 * The connection knows nothing of virtqueues: it reads and writes descriptor chains it is
 * handed, and reaches the rest of the device through `ConnectionContext`.
 */
import {
  close,
  EAGAIN,
  EPOLLET,
  EPOLLHUP,
  EPOLLIN,
  EPOLLOUT,
  EPOLLRDHUP,
  pollFds,
  POLLHUP,
  readvRaw,
  SHUT_WR,
  shutdownRaw,
  writeRaw,
  writevRaw,
} from "../../ffi/mod.ts";
import type { MessageIo } from "../../ffi/message.ts";
import { log } from "../log.ts";
import type { Reactor, Timer } from "../reactor.ts";
import type { DescChain } from "../virtio/desc_chain.ts";
import { ByteQueue } from "./byte_queue.ts";
import { formatOkLine } from "./connect_line.ts";
import {
  CLOSE_DRAIN_TIMEOUT_MS,
  MAX_PKT_PAYLOAD,
  SHUTDOWN_TIMEOUT_MS,
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_OP_CREDIT_REQUEST,
  VIRTIO_VSOCK_OP_CREDIT_UPDATE,
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RESPONSE,
  VIRTIO_VSOCK_OP_RST,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_OP_SHUTDOWN,
  VIRTIO_VSOCK_SHUTDOWN_F_BOTH,
  VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE,
  VIRTIO_VSOCK_SHUTDOWN_F_SEND,
  VIRTIO_VSOCK_TYPE_SEQPACKET,
  VIRTIO_VSOCK_TYPE_STREAM,
  VSOCK_HOST_CID,
} from "./constants.ts";
import { Credit } from "./credit.ts";
import type { PacketHeader } from "./packet.ts";
import { RX_BATCH_MAX_CHAINS, type RxChainSource } from "./rx_batch.ts";
import type { RxFlow } from "./rx_scheduler.ts";
import { SeqpacketMessages } from "./seqpacket.ts";
import type { DeviceStats } from "./stats.ts";
import type { WindowAutotune } from "./autotune.ts";
import type { TxGather } from "./tx_gather.ts";

export const ConnState = {
  CONNECTING: 1,
  ESTABLISHED: 2,
  CLOSED: 3,
} as const;
export type ConnState = typeof ConnState[keyof typeof ConnState];

/** Packets owed to the guest. */
export const Pending = {
  REQUEST: 1,
  RESPONSE: 2,
  SHUTDOWN: 4,
  CREDIT_UPDATE: 8,
  RST: 16,
  /** confirm the guest still has this connection (see `restore.ts`) */
  CREDIT_REQUEST: 32,
} as const;

/** Scratch for `#readHost`: the extra chains of one read and their payload room. */
const EXTRA_CHAINS: DescChain[] = [];
const EXTRA_CAPS = new Uint32Array(RX_BATCH_MAX_CHAINS);
/** Leave a few of the context's iovecs unused by multi-chain reads (a chain may need several). */
const MAX_READ_IOV = 60;

/** Owed packets that carry only a header and need no data before them. */
const HEADER_ONLY_FIRST = Pending.RST | Pending.REQUEST | Pending.RESPONSE |
  Pending.CREDIT_UPDATE | Pending.CREDIT_REQUEST;

/** What a connection needs from the device around it (the muxer provides it). */
export interface ConnectionContext {
  readonly reactor: Reactor;
  readonly guestCid: number;
  readonly stats: DeviceStats;
  readonly gather: TxGather;
  /** scratch iovec array for one packet's readv/writev */
  readonly iov: BigUint64Array;
  /** message I/O for seqpacket host sockets */
  readonly msgIo: MessageIo;
  /** further rx chains for multi-buffer reads (while the device fills a buffer), or null */
  readonly rxChains: RxChainSource | null;
  /** receive-window autotuning (`--no-autotune`: null) */
  readonly autotune: WindowAutotune | null;
  /** the header `fillRx` fills; written into the chain by `emit` */
  readonly header: PacketHeader;
  /** writes `header` at the start of the chain's writable part */
  emit(chain: DescChain): void;
  /** `c` owes the guest a packet: put it in the RX scheduler */
  scheduleRx(c: VsockConnection): void;
  /** `c` closed its host side: drop it from the connection table */
  forget(c: VsockConnection): void;
  /** the guest accepted a host connect on `port` (it keeps that listener across a reset) */
  guestAccepted(port: number): void;
  /** a connection's life-cycle line (info, rate-limited: host apps and guests set the pace) */
  logEvent(msg: string): void;
  /** a peer misbehaved (warn, rate-limited) */
  logFault(msg: string): void;
}

export class VsockConnection implements RxFlow {
  state: ConnState;
  readonly credit: Credit;
  /** guest -> host bytes the host socket has not taken yet */
  readonly toHost: ByteQueue;
  /** host -> guest bytes read early (after the CONNECT line), sent before the socket's */
  fromHost: Uint8Array | null = null;
  /** Pending.* bits */
  pending = 0;
  /** SHUTDOWN flags to send with Pending.SHUTDOWN */
  shutdownFlagsToSend = 0;
  /** SHUTDOWN flags received from the guest (sticky) */
  guestShutdown = 0;
  /** the host socket may have data (edge-triggered epoll: true until EAGAIN) */
  hostReadable = false;
  /** the host socket reached EOF (the host app will send no more) */
  hostEof = false;
  /** the host app closed its socket entirely (EPOLLHUP): it will neither send nor receive */
  hostHup = false;
  /** shutdown(SHUT_WR) was done on the host socket */
  hostWriteShut = false;
  /** the guest closed (SHUTDOWN both) while bytes for the host were still queued: finish
   * delivering them, then close and RST */
  closeWhenFlushed = false;
  /** queued in the RX scheduler */
  inRxQueue = false;
  /** RX scheduler: bytes left in this round */
  deficit = 0;
  /** RX scheduler: share of the guest's rx queue (`--rx-weight` of the guest port) */
  weight = 1;
  /** connect timeout (host-initiated) or close-drain timeout */
  timer: Timer | null = null;
  /** for logs and snapshots */
  readonly hostInitiated: boolean;
  /** the window advertised at the start (autotuning grows from it) */
  readonly initialWindow: number;
  /** seqpacket only: message boundaries both ways (seqpacket.ts) */
  readonly messages: SeqpacketMessages | null;

  constructor(
    readonly ctx: ConnectionContext,
    readonly localPort: number,
    readonly peerPort: number,
    public hostFd: number,
    state: ConnState,
    bufAlloc: number,
    hostInitiated: boolean,
    /** VIRTIO_VSOCK_TYPE_STREAM or VIRTIO_VSOCK_TYPE_SEQPACKET */
    readonly type: number = VIRTIO_VSOCK_TYPE_STREAM,
  ) {
    this.state = state;
    this.messages = type === VIRTIO_VSOCK_TYPE_SEQPACKET ? new SeqpacketMessages(this) : null;
    this.initialWindow = bufAlloc;
    this.credit = new Credit(bufAlloc);
    this.toHost = new ByteQueue(bufAlloc);
    this.hostInitiated = hostInitiated;
  }

  /** The host side is closed (the guest may still be owed an RST). */
  get closed(): boolean {
    return this.state === ConnState.CLOSED;
  }

  /** Closed and owing nothing: the RX scheduler drops it. */
  get done(): boolean {
    return this.state === ConnState.CLOSED && (this.pending & Pending.RST) === 0;
  }

  /** Host bytes are owed to the guest and its credit allows some (early bytes or a readable
   * socket, the guest still receiving). */
  #owesData(): boolean {
    if (this.state !== ConnState.ESTABLISHED) return false;
    if ((this.guestShutdown & VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE) !== 0) return false;
    if (this.credit.peerFree() <= 0) return false;
    if (this.messages?.delivering) return true;
    return this.fromHost !== null || (this.hostReadable && !this.hostEof);
  }

  /** Something to send to the guest right now (control, early bytes or host data within credit). */
  hasRxWork(): boolean {
    return this.pending !== 0 || this.#owesData();
  }

  /**
   * Whether `fillRx` can put a packet into an rx buffer with `room` bytes after the header:
   * control packets need only the header; data needs room for at least one byte, and a
   * SHUTDOWN waits behind the data owed before it. The RX scheduler and `fillRx` both go by
   * this one predicate, so a buffer a connection cannot use is never handed to it in a loop.
   */
  canSendInto(room: number): boolean {
    const p = this.pending;
    if ((p & HEADER_ONLY_FIRST) !== 0) return true;
    if (this.#owesData()) return room > 0;
    return (p & Pending.SHUTDOWN) !== 0;
  }

  describe(): string {
    return `${
      this.hostInitiated ? "host" : "guest"
    }-initiated 2:${this.localPort} <-> guest:${this.peerPort}`;
  }

  // --- packets from the guest ----------------------------------------------------------------

  /** A guest packet for this connection (header validated, type STREAM). */
  onGuestPacket(h: PacketHeader, chain: DescChain): void {
    const hadCredit = this.credit.peerFree() > 0;
    this.credit.updateFromPeer(h.bufAlloc, h.fwdCnt);
    switch (h.op) {
      case VIRTIO_VSOCK_OP_RW:
        this.#guestData(chain, h.len, h.flags);
        break;
      case VIRTIO_VSOCK_OP_RESPONSE:
        this.#guestAccepted();
        break;
      case VIRTIO_VSOCK_OP_RST:
        this.destroy(false);
        return;
      case VIRTIO_VSOCK_OP_SHUTDOWN:
        this.#guestShutdown(h.flags);
        break;
      case VIRTIO_VSOCK_OP_CREDIT_REQUEST:
        this.pending |= Pending.CREDIT_UPDATE;
        this.ctx.scheduleRx(this);
        break;
      case VIRTIO_VSOCK_OP_CREDIT_UPDATE:
        break;
      case VIRTIO_VSOCK_OP_REQUEST:
        // A REQUEST for a connection that exists: the guest lost track of it.
        this.ctx.logFault(
          `vsock: REQUEST for an existing connection (${this.describe()}); resetting it`,
        );
        this.reset();
        return;
    }
    if (
      this.state !== ConnState.CLOSED && !hadCredit && this.credit.peerFree() > 0 &&
      this.hasRxWork()
    ) {
      this.ctx.scheduleRx(this);
    }
  }

  #guestAccepted(): void {
    if (this.state !== ConnState.CONNECTING) {
      this.ctx.logFault(`vsock: unexpected RESPONSE on ${this.describe()}; resetting`);
      this.reset();
      return;
    }
    this.timer?.cancel();
    this.timer = null;
    this.state = ConnState.ESTABLISHED;
    const ok = new TextEncoder().encode(formatOkLine(this.localPort));
    const n = writeRaw(this.hostFd, ok);
    if (n !== ok.length) {
      this.ctx.logEvent(`vsock: host app of ${this.describe()} went away before OK; resetting`);
      this.reset();
      return;
    }
    this.watchHost();
    this.ctx.guestAccepted(this.peerPort);
    this.ctx.logEvent(`vsock: established ${this.describe()}`);
    if (this.hasRxWork()) this.ctx.scheduleRx(this);
  }

  #guestData(chain: DescChain, len: number, flags: number): void {
    if (len === 0 && this.type !== VIRTIO_VSOCK_TYPE_SEQPACKET) return;
    if (
      this.state !== ConnState.ESTABLISHED || this.hostFd < 0 ||
      (this.guestShutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND) !== 0
    ) {
      this.ctx.logFault(`vsock: data on ${this.describe()} in the wrong state; resetting`);
      this.reset();
      return;
    }
    if (!this.credit.onReceived(len)) {
      this.ctx.logFault(`vsock: guest exceeded our credit on ${this.describe()}; resetting`);
      this.reset();
      return;
    }
    this.ctx.stats.txBytes += len;
    if (this.type === VIRTIO_VSOCK_TYPE_SEQPACKET) {
      this.messages!.fromGuest(chain, len, flags);
      return;
    }
    if (this.toHost.length === 0 && !this.hostWriteShut) {
      if (this.ctx.gather.add(this, chain, len)) return;
      // add() may have flushed this connection's earlier payloads: if the socket did not
      // take them all they wait in toHost, and this payload must queue behind them.
    }
    if (this.closed) return;
    if (this.toHost.length === 0 && !this.hostWriteShut) {
      const iov = this.ctx.iov;
      const iovs = chain.hostIovecs(chain.mem!, iov, VIRTIO_VSOCK_HDR_SIZE, len, false);
      const k = this.wroteToHost(writevRaw(this.hostFd, iov, iovs), len);
      if (k > 0) this.copyToHost(chain, VIRTIO_VSOCK_HDR_SIZE + len - k, k);
      return;
    }
    if (this.queueToHost(len)) this.copyToHost(chain, VIRTIO_VSOCK_HDR_SIZE, len);
  }

  /**
   * Copies `n` bytes of `chain` from `skip` into the window `queueToHost` reserved in
   * `toHost` (in two parts when it wraps) and commits them. @internal (seqpacket.ts)
   */
  copyToHost(chain: DescChain, skip: number, n: number): void {
    const q = this.toHost;
    chain.readInto(q.first, skip);
    if (q.second.length > 0) chain.readInto(q.second, skip + q.first.length);
    q.commit(n);
  }

  /**
   * Accounts a writev of `len` guest bytes to the host socket that returned `n`. Returns
   * how many of them the socket did not take (the last k of the `len`), for which room is
   * reserved in `toHost` (`toHost.first` / `toHost.second`: the caller copies them there,
   * then `toHost.commit(k)`), or 0 when there is nothing to copy (all written, or the
   * connection was reset).
   */
  wroteToHost(n: number, len: number): number {
    if (n < 0 && n !== -EAGAIN) {
      this.ctx.logEvent(`vsock: host app of ${this.describe()} closed (errno ${-n}); resetting`);
      this.reset();
      return 0;
    }
    const written = n > 0 ? n : 0;
    if (written > 0) this.forwarded(written);
    if (written >= len) return 0;
    return this.queueToHost(len - written) ? len - written : 0;
  }

  /**
   * Reserves room for `n` more bytes in the guest -> host backlog; false (and a reset) on
   * overflow. @internal (seqpacket.ts)
   */
  queueToHost(n: number): boolean {
    if (this.toHost.reserve(n)) return true;
    this.ctx.logFault(`vsock: guest->host buffer overflow on ${this.describe()}; resetting`);
    this.reset();
    return false;
  }

  /** `n` bytes reached the host app: credit goes back to the guest. @internal (seqpacket.ts) */
  forwarded(n: number): void {
    this.credit.onForwarded(n);
    if (!this.closeWhenFlushed && this.credit.needsCreditUpdate()) {
      this.#autotune();
      this.pending |= Pending.CREDIT_UPDATE;
      this.ctx.scheduleRx(this);
    }
  }

  /**
   * Receive-window autotuning (as TCP tunes its receive buffer): when a credit update is due,
   * the host app is keeping up (nothing waits in `toHost`) and the guest had used three
   * quarters of its window since the last update, the guest is window-bound: double the
   * window we advertise, up to the autotuner's maximum and within its memory budget. The
   * reservation is our high-water mark (`rxLimit`, what the guest may ever have in flight)
   * and is returned when the connection closes.
   */
  #autotune(): void {
    const tuner = this.ctx.autotune;
    const c = this.credit;
    if (tuner === null || this.toHost.length > 0 || c.bufAlloc >= tuner.maxWindow) return;
    if (c.peerSeenFree() * 4 > c.bufAlloc) return;
    const next = Math.min(c.bufAlloc * 2, tuner.maxWindow);
    const more = next - c.rxLimit;
    if (more > 0 && !tuner.reserve(more)) return;
    c.setBufAlloc(next);
    this.toHost.grow(c.rxLimit);
  }

  /** The host socket is writable again: drain what the guest sent meanwhile. */
  flushToHost(): void {
    if (this.type === VIRTIO_VSOCK_TYPE_SEQPACKET) {
      if (!this.messages!.flush() || this.closed) return;
      if ((this.guestShutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND) !== 0) this.messages!.dropPartial();
    }
    while (this.toHost.length > 0 && this.type !== VIRTIO_VSOCK_TYPE_SEQPACKET) {
      const data = this.toHost.front();
      const n = writeRaw(this.hostFd, data, data.length);
      if (n === -EAGAIN) return;
      if (n < 0) {
        this.ctx.logEvent(`vsock: host app of ${this.describe()} closed (errno ${-n}); resetting`);
        this.reset();
        return;
      }
      this.toHost.consume(n);
      this.forwarded(n);
    }
    if (this.closeWhenFlushed) {
      this.reset();
      return;
    }
    this.#maybeShutHostWrite();
  }

  #guestShutdown(flags: number): void {
    this.guestShutdown |= flags & VIRTIO_VSOCK_SHUTDOWN_F_BOTH;
    if (log.debugOn) log.debug(`vsock: guest shutdown flags ${flags} on ${this.describe()}`);
    if ((this.guestShutdown & VIRTIO_VSOCK_SHUTDOWN_F_BOTH) === VIRTIO_VSOCK_SHUTDOWN_F_BOTH) {
      // The guest is closing: hand over everything it sent, then close and confirm with
      // RST. If the host app is slow, wait for the socket to drain (the guest waits for our
      // RST up to its close timeout, 8 s on Linux, then resets the connection itself).
      this.flushToHost();
      if (this.state === ConnState.CLOSED) return;
      if (this.toHost.length === 0) {
        this.reset();
      } else if (!this.closeWhenFlushed) {
        this.closeWhenFlushed = true;
        this.timer?.cancel();
        this.timer = this.ctx.reactor.setTimer(CLOSE_DRAIN_TIMEOUT_MS, () => {
          this.timer = null;
          this.ctx.logFault(
            `vsock: host app of ${this.describe()} did not take ${this.toHost.length} bytes ` +
              `within ${CLOSE_DRAIN_TIMEOUT_MS} ms of the guest closing; resetting`,
          );
          this.reset();
        });
      }
      return;
    }
    this.#maybeShutHostWrite();
    this.#maybeFinish();
  }

  #maybeShutHostWrite(): void {
    if (
      !this.hostWriteShut && this.toHost.length === 0 && this.hostFd >= 0 &&
      (this.guestShutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND) !== 0
    ) {
      this.hostWriteShut = true;
      shutdownRaw(this.hostFd, SHUT_WR);
      this.#maybeFinish();
    }
  }

  /** Both directions are done: close the host socket and tell the guest with RST. */
  #maybeFinish(): void {
    if (
      this.state === ConnState.ESTABLISHED && this.hostEof && this.hostWriteShut &&
      (this.pending & Pending.SHUTDOWN) === 0
    ) {
      if (log.debugOn) log.debug(`vsock: both directions closed on ${this.describe()}`);
      this.reset();
    }
  }

  // --- the host socket -----------------------------------------------------------------------

  /** Watches the host socket (edge-triggered): writable drains `toHost`, readable feeds RX. */
  watchHost(): void {
    this.ctx.reactor.addFd(this.hostFd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, (ev) => {
      if (this.closed) return;
      if ((ev & EPOLLOUT) !== 0 && this.toHost.length > 0) this.flushToHost();
      if (this.closed) return;
      if ((ev & ~EPOLLOUT) !== 0) {
        if ((ev & EPOLLHUP) !== 0) this.#onHostHup();
        this.hostReadable = true;
        if (this.hasRxWork()) this.ctx.scheduleRx(this);
      }
    });
  }

  /**
   * The host app closed its socket entirely. If its EOF was already read and announced as a
   * half-close (the HUP came later), the guest now gets SHUTDOWN with both flags.
   */
  #onHostHup(): void {
    if (this.hostHup) return;
    this.hostHup = true;
    if (this.hostEof && this.shutdownFlagsToSend !== VIRTIO_VSOCK_SHUTDOWN_F_BOTH) {
      this.shutdownFlagsToSend = VIRTIO_VSOCK_SHUTDOWN_F_BOTH;
      this.pending |= Pending.SHUTDOWN;
    }
  }

  /** Host-initiated: owe the guest a REQUEST and give it `ms` to answer. */
  offerToGuest(ms: number): void {
    this.pending |= Pending.REQUEST;
    this.timer = this.ctx.reactor.setTimer(ms, () => {
      this.timer = null;
      this.ctx.logEvent(`vsock: guest did not accept ${this.describe()} within ${ms} ms`);
      this.reset();
    });
    this.ctx.scheduleRx(this);
  }

  // --- packets to the guest ------------------------------------------------------------------

  /** Fills `ctx.header` for a packet of this connection (credit stamped, except on RST). */
  initHeader(op: number, flags = 0, len = 0): PacketHeader {
    const h = this.ctx.header;
    h.reset();
    h.srcCid = VSOCK_HOST_CID;
    h.dstCid = this.ctx.guestCid;
    h.srcPort = this.localPort;
    h.dstPort = this.peerPort;
    h.len = len;
    h.type = this.type;
    h.op = op;
    h.flags = flags;
    if (op !== VIRTIO_VSOCK_OP_RST) {
      this.credit.stamp(h);
      this.pending &= ~Pending.CREDIT_UPDATE;
    }
    return h;
  }

  /**
   * Writes the next packet owed to the guest into `chain`; returns its length or -1 (nothing
   * could go into this buffer: see `canSendInto`).
   */
  fillRx(chain: DescChain): number {
    const p = this.pending;
    if (p & Pending.RST) {
      this.pending = 0;
      return this.#emit(chain, VIRTIO_VSOCK_OP_RST);
    }
    if (p & Pending.REQUEST) {
      this.pending &= ~Pending.REQUEST;
      return this.#emit(chain, VIRTIO_VSOCK_OP_REQUEST);
    }
    if (p & Pending.RESPONSE) {
      this.pending &= ~Pending.RESPONSE;
      return this.#emit(chain, VIRTIO_VSOCK_OP_RESPONSE);
    }
    if (p & Pending.CREDIT_REQUEST) {
      this.pending &= ~Pending.CREDIT_REQUEST;
      return this.#emit(chain, VIRTIO_VSOCK_OP_CREDIT_REQUEST);
    }
    // Data before SHUTDOWN: the SHUTDOWN for host EOF goes after the bytes read.
    const room = chain.writableLen - VIRTIO_VSOCK_HDR_SIZE;
    if (room > 0 && this.#owesData()) {
      const data = this.#fillData(chain, room);
      if (data >= 0) return data;
    }
    if (this.closed) return -1;
    if ((this.pending & Pending.SHUTDOWN) !== 0 && !this.#owesData()) {
      this.pending &= ~Pending.SHUTDOWN;
      const len = this.#emit(chain, VIRTIO_VSOCK_OP_SHUTDOWN, this.shutdownFlagsToSend);
      if (this.shutdownFlagsToSend === VIRTIO_VSOCK_SHUTDOWN_F_BOTH) this.#hostGone();
      else this.#maybeFinish();
      return len;
    }
    if (this.pending & Pending.CREDIT_UPDATE) {
      this.pending &= ~Pending.CREDIT_UPDATE;
      return this.#emit(chain, VIRTIO_VSOCK_OP_CREDIT_UPDATE);
    }
    return -1;
  }

  /** A header-only packet. */
  #emit(chain: DescChain, op: number, flags = 0): number {
    this.initHeader(op, flags);
    this.ctx.emit(chain);
    return VIRTIO_VSOCK_HDR_SIZE;
  }

  /**
   * One RW packet of at most `room` bytes from early bytes or the host socket (the caller
   * checked `#owesData()`); -1 if the socket had nothing after all.
   */
  #fillData(chain: DescChain, room: number): number {
    if (this.messages !== null) return this.messages.fill(chain, room);
    const max = Math.min(room, this.credit.peerFree(), MAX_PKT_PAYLOAD);
    let n: number;
    if (this.fromHost !== null) {
      const early = this.fromHost;
      n = Math.min(max, early.length);
      chain.writeFrom(early.subarray(0, n), VIRTIO_VSOCK_HDR_SIZE);
      this.fromHost = n < early.length ? early.subarray(n) : null;
    } else {
      return this.#readHost(chain, max);
    }
    return this.#dataPacket(chain, n);
  }

  /** Finishes an RW packet of `n` payload bytes already in `chain`. */
  #dataPacket(chain: DescChain, n: number): number {
    this.credit.consumeTx(n);
    this.ctx.stats.rxBytes += n;
    this.initHeader(VIRTIO_VSOCK_OP_RW, 0, n);
    this.ctx.emit(chain);
    return VIRTIO_VSOCK_HDR_SIZE + n;
  }

  /**
   * Reads host bytes straight into `chain` (at most `max`) and, while the guest's credit
   * allows more, into further rx chains lent by `ctx.rxChains` (see rx_batch.ts): one readv,
   * one RW packet per chain. Returns the first packet's length, or -1 with nothing read.
   */
  #readHost(chain: DescChain, max: number): number {
    const iov = this.ctx.iov;
    let iovs = chain.hostIovecs(chain.mem!, iov, VIRTIO_VSOCK_HDR_SIZE, max, true);
    const first = chain.iovBytes;
    const src = this.ctx.rxChains;
    let extra = 0;
    // Further chains within the guest's credit and this flow's DRR turn (rx_scheduler.ts).
    let credit = this.credit.peerFree() - first;
    let turn = this.deficit - chain.writableLen; // the scheduler charges whole buffers
    while (src !== null && credit > 0 && turn > 0 && first === max && iovs < MAX_READ_IOV) {
      const c = src.take();
      if (c === null) break;
      const want = Math.min(c.writableLen - VIRTIO_VSOCK_HDR_SIZE, credit, MAX_PKT_PAYLOAD);
      const k = c.hostIovecs(c.mem!, iov, VIRTIO_VSOCK_HDR_SIZE, want, true, iovs);
      if (c.iovBytes === 0) {
        src.giveBack(1);
        break;
      }
      EXTRA_CHAINS[extra] = c;
      EXTRA_CAPS[extra] = c.iovBytes;
      extra++;
      iovs += k;
      credit -= c.iovBytes;
      turn -= c.writableLen;
    }
    const n = readvRaw(this.hostFd, iov, iovs);
    if (n <= 0) {
      if (extra > 0) src!.giveBack(extra);
      if (n === -EAGAIN) this.hostReadable = false;
      else if (n === 0) this.hostEofSeen();
      else {
        this.ctx.logEvent(
          `vsock: host socket error on ${this.describe()} (errno ${-n}); resetting`,
        );
        this.reset();
      }
      return -1;
    }
    const n0 = Math.min(n, first);
    chain.markWritten(VIRTIO_VSOCK_HDR_SIZE, n0);
    const len = this.#dataPacket(chain, n0);
    let left = n - n0;
    let filled = 0;
    for (; filled < extra && left > 0; filled++) {
      const c = EXTRA_CHAINS[filled];
      const ni = Math.min(left, EXTRA_CAPS[filled]);
      c.markWritten(VIRTIO_VSOCK_HDR_SIZE, ni);
      const pkt = this.#dataPacket(c, ni);
      src!.complete(c, pkt);
      this.deficit -= c.writableLen; // the whole read is this flow's turn (the scheduler charges the first)
      left -= ni;
    }
    if (filled < extra) src!.giveBack(extra - filled);
    return len;
  }

  /**
   * Host EOF: a half-close toward the guest (SHUTDOWN with SEND only), or a full close when
   * the app closed its socket (SHUTDOWN with both flags; see #hostGone).
   */
  hostEofSeen(): void {
    this.hostReadable = false;
    this.hostEof = true;
    // The HUP may not have been reported yet when the EOF is read: ask the socket.
    if (!this.hostHup) this.hostHup = (pollFds([this.hostFd], [0], 0)[0] & POLLHUP) !== 0;
    this.shutdownFlagsToSend = this.hostHup
      ? VIRTIO_VSOCK_SHUTDOWN_F_BOTH
      : VIRTIO_VSOCK_SHUTDOWN_F_SEND;
    this.pending |= Pending.SHUTDOWN;
    if (log.debugOn) log.debug(`vsock: host EOF on ${this.describe()}`);
  }

  // --- teardown ------------------------------------------------------------------------------

  /**
   * The host app closed its socket and the guest was told (SHUTDOWN with both flags): free
   * the host socket now, and wait for the guest's RST (Linux sends it at once when nothing
   * is left unread) at most SHUTDOWN_TIMEOUT_MS before ending the connection ourselves. A
   * host app that connects and closes at once therefore never pins an fd or a table slot.
   */
  #hostGone(): void {
    if (this.closed) return;
    if (this.toHost.length > 0 && log.debugOn) {
      log.debug(`vsock: ${this.toHost.length} bytes for a closed host app dropped`);
    }
    this.#closeHostFd();
    this.timer?.cancel();
    this.timer = this.ctx.reactor.setTimer(SHUTDOWN_TIMEOUT_MS, () => {
      this.timer = null;
      if (log.debugOn) {
        log.debug(`vsock: no RST from the guest for ${this.describe()}; sending one`);
      }
      this.reset();
    });
  }

  #releaseWindow(): void {
    const extra = this.credit.rxLimit - this.initialWindow;
    if (extra > 0) this.ctx.autotune?.release(extra);
  }

  #closeHostFd(): void {
    if (this.hostFd < 0) return;
    this.ctx.reactor.removeFd(this.hostFd);
    close(this.hostFd);
    this.hostFd = -1;
    this.toHost.clear();
    this.fromHost = null;
  }

  /** Ends the connection: closes the host socket and owes the guest an RST. */
  reset(): void {
    if (this.state === ConnState.CLOSED) return;
    this.destroy(true);
  }

  /** Closes the host side (once); with `sendRst` the guest is owed an RST. */
  destroy(sendRst: boolean): void {
    if (this.state !== ConnState.CLOSED) {
      this.state = ConnState.CLOSED;
      this.timer?.cancel();
      this.timer = null;
      this.#closeHostFd();
      this.#releaseWindow();
      this.ctx.forget(this);
      this.ctx.stats.resets++;
      if (log.debugOn) log.debug(`vsock: closed ${this.describe()}`);
    }
    if (sendRst) {
      this.pending = Pending.RST;
      this.ctx.scheduleRx(this);
    } else {
      this.pending = 0;
    }
  }
}
