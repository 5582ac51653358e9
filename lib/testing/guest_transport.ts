/**
 * The protocol side of the testing guest driver (`VsockGuest`), with the rules of Linux's
 * `net/vmw_vsock/virtio_transport_common.c`: the connection table, listeners, and the packets
 * that move a connection between states.
 *
 * - connect: REQUEST, then RESPONSE (established) or RST (refused); no answer within the
 *   connect timeout ends it as "connect-timeout";
 * - listen (`virtio_transport_recv_listen`): a REQUEST to a listening port is answered with
 *   RESPONSE and queued for `accept`; a packet for no socket gets an RST back
 *   (`virtio_transport_reset_no_sock`), unless it is an RST;
 * - credit: every packet we send is stamped with the connection's `buf_alloc` / `fwd_cnt`, RW
 *   payload never exceeds the peer's free credit, a CREDIT_REQUEST is answered with a
 *   CREDIT_UPDATE (see guest_conn.ts for the per-connection rules);
 * - SHUTDOWN / RST: a peer that shut down both directions gets an RST once its data is read; an
 *   RST ends the connection ("closed" after our close(), else "peer-reset");
 * - TRANSPORT_RESET (and a driver reset) drop every connection without packets, together with
 *   their packets still waiting for a tx buffer; listeners survive.
 *
 * Socket types (`virtio_transport_recv_pkt`): STREAM and SEQPACKET connections share one table
 * keyed by (local port, peer CID, peer port), and listeners one table keyed by port, as Linux's
 * connected and bound tables do; a packet whose type differs from the socket's gets an RST
 * (`virtio_transport_reset_no_sock`) and leaves the socket alone. A seqpacket connect needs
 * VIRTIO_VSOCK_F_SEQPACKET (else ESOCKTNOSUPPORT); a SEQPACKET packet arriving without it is
 * an anomaly and gets an RST. DGRAM packets (only with VIRTIO_VSOCK_F_DGRAM; otherwise an
 * anomaly, dropped) go to the datagram socket bound to their port (guest_dgram.ts), never
 * answered with an RST.
 *
 * Header-only packets that find no free tx buffer wait in a FIFO backlog, drained before any new
 * packet is placed. Anything the back end does that a Linux guest would drop or that breaks the
 * spec is recorded as an anomaly.
 */

import { featureMask } from "../virtio/features.ts";
import {
  MAX_PKT_PAYLOAD,
  VIRTIO_VSOCK_F_DGRAM,
  VIRTIO_VSOCK_F_SEQPACKET,
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_OP_CREDIT_REQUEST,
  VIRTIO_VSOCK_OP_CREDIT_UPDATE,
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RESPONSE,
  VIRTIO_VSOCK_OP_RST,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_OP_SHUTDOWN,
  VIRTIO_VSOCK_TYPE_DGRAM,
  VIRTIO_VSOCK_TYPE_SEQPACKET,
  VIRTIO_VSOCK_TYPE_STREAM,
} from "../vsock/constants.ts";
import { PacketHeader, resetReplyFor } from "../vsock/packet.ts";
import {
  type ConnDriver,
  type GuestCloseReason,
  GuestConn,
  GuestConnError,
  type WaitOptions,
  wireType,
} from "./guest_conn.ts";
import {
  type BindDgramOptions,
  checkU32,
  type DgramDriver,
  GuestDgramSocket,
  LINUX_RMEM_DEFAULT,
} from "./guest_dgram.ts";
import type {
  CapturedPacket,
  GuestSocketType,
  GuestStats,
  PacketCapture,
  VsockGuestOptions,
} from "./guest_types.ts";
import type { GuestRings, RxBuf, TxSlot } from "./guest_rings.ts";
import { GuestTimeoutError } from "./guest_wait.ts";

/** Linux's default SO_VM_SOCKETS_BUFFER_SIZE (the buf_alloc it advertises). */
export const LINUX_BUF_ALLOC = 256 * 1024;
/** Linux's VSOCK_DEFAULT_CONNECT_TIMEOUT (2 s). */
export const LINUX_CONNECT_TIMEOUT_MS = 2000;

/** A connect() that failed: refused (RST), timed out, or broken by a reset. */
export class GuestConnectError extends Error {
  override name = "GuestConnectError";
  constructor(message: string, readonly reason: GuestCloseReason | null) {
    super(message);
  }
}

/** Options of `VsockGuest.listen`. */
export interface ListenOptions {
  /** socket type (default "stream") */
  readonly type?: GuestSocketType;
}

/** Options of `VsockGuest.connect`. */
export interface ConnectOptions extends WaitOptions {
  /** socket type (default "stream") */
  readonly type?: GuestSocketType;
}

/** What a listener needs from the driver. */
export type ListenerDriver = Pick<ConnDriver, "timeoutMs" | "waitFor">;

/** A listening guest port. */
export class GuestListener {
  readonly #queue: GuestConn[] = [];
  #closed = false;

  /** @internal Created by `VsockGuest.listen`. */
  constructor(
    readonly port: number,
    private readonly driver: ListenerDriver,
    private readonly onClose: (l: GuestListener) => void,
    /** socket type of the listener and of the connections it accepts */
    readonly type: GuestSocketType = "stream",
  ) {}

  /** Connections accepted by the driver and not yet taken with `accept`. */
  get pending(): number {
    return this.#queue.length;
  }

  /** Whether `close()` was called. */
  get closed(): boolean {
    return this.#closed;
  }

  /** The next incoming connection (already answered with RESPONSE). */
  async accept(opts: WaitOptions = {}): Promise<GuestConn> {
    const deadline = performance.now() + (opts.timeoutMs ?? this.driver.timeoutMs);
    // Several accepts may wait at once: each takes one connection, the others keep waiting.
    for (;;) {
      const c = this.#queue.shift();
      if (c !== undefined) return c;
      if (this.#closed) throw new GuestConnError(`listener on port ${this.port} is closed`);
      await this.driver.waitFor(
        () => this.#queue.length > 0 || this.#closed,
        Math.max(0, deadline - performance.now()),
        `an incoming connection on guest port ${this.port}`,
      );
    }
  }

  /** Stops listening; connections not yet accepted are reset. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.onClose(this);
    for (const c of this.#queue.splice(0)) c.reset();
  }

  /** @internal */
  _push(c: GuestConn): void {
    this.#queue.push(c);
  }

  /** @internal Drops queued connections that ended. */
  _prune(): void {
    for (let i = this.#queue.length - 1; i >= 0; i--) {
      if (this.#queue[i].closed) this.#queue.splice(i, 1);
    }
  }
}

/** What the transport needs from the rest of the driver. */
export interface TransportHost {
  readonly opts: VsockGuestOptions;
  readonly stats: GuestStats;
  readonly anomalies: string[];
  readonly timeoutMs: number;
  readonly closeTimeoutMs: number;
  /** the current rings (null before the probe and after close) */
  rings(): GuestRings | null;
  /** the guest's CID (re-read on TRANSPORT_RESET) */
  cid(): number;
  /** the virtio features the driver acked */
  features(): bigint;
  /** throws if the driver is closed */
  checkUsable(): void;
  /** publishes queued buffers and kicks as needed */
  flush(): void;
  /** `VsockGuest.waitFor` */
  waitFor(pred: () => boolean, timeoutMs: number, what: string): Promise<void>;
}

interface Backlogged {
  readonly conn: GuestConn | null;
  readonly header: PacketHeader;
}

/** Connections, listeners, datagram sockets and the packets between them and the rings. */
export class GuestTransport implements ConnDriver, DgramDriver {
  readonly timeoutMs: number;
  readonly closeTimeoutMs: number;
  readonly conns = new Map<string, GuestConn>();
  readonly listeners = new Map<number, GuestListener>();
  readonly dgrams = new Map<number, GuestDgramSocket>();
  readonly backlog: Backlogged[] = [];
  readonly #host: TransportHost;
  readonly #captures = new Set<CapturedPacket[]>();
  #nextPort: number;
  /** scratch headers: one for received packets, one for outgoing RW packets */
  readonly #rxHdr = new PacketHeader();
  readonly #txHdr = new PacketHeader();

  constructor(host: TransportHost) {
    this.#host = host;
    this.timeoutMs = host.timeoutMs;
    this.closeTimeoutMs = host.closeTimeoutMs;
    this.#nextPort = host.opts.firstEphemeralPort ?? 1024;
  }

  // ---- ConnDriver ----

  sendControl(conn: GuestConn, op: number, flags: number): void {
    const h = this.#fillHeader(new PacketHeader(), conn, op, flags);
    this.#queueControl(conn, h);
  }

  canSendData(conn: GuestConn): boolean {
    const r = this.#host.rings();
    if (r === null || this.backlog.length > 0 || r.txFree.length === 0) return false;
    return conn.credit.peerFree() > 0 && r.hasTxRoom(Infinity);
  }

  sendData(conn: GuestConn, bytes: Uint8Array, off: number, lastFlags: number): number {
    this.#host.checkUsable();
    let sent = 0;
    const maxPayload = this.#host.opts.maxPacketPayload ?? 65536;
    while (off + sent < bytes.length && this.canSendData(conn)) {
      const n = Math.min(bytes.length - off - sent, conn.credit.peerFree(), maxPayload);
      const flags = off + sent + n === bytes.length ? lastFlags : 0;
      const h = this.#fillHeader(this.#txHdr, conn, VIRTIO_VSOCK_OP_RW, flags);
      if (this.#place(conn, h, bytes, off + sent, n) === null) break;
      conn.credit.consumeTx(n); // n <= peerFree(): never beyond the peer's credit
      conn._sent(n);
      sent += n;
    }
    return sent;
  }

  flush(): void {
    this.#host.flush();
  }

  waitFor(pred: () => boolean, timeoutMs: number, what: string): Promise<void> {
    return this.#host.waitFor(pred, timeoutMs, what);
  }

  forget(conn: GuestConn): void {
    const k = key(conn.localPort, conn.peerCid, conn.peerPort);
    if (this.conns.get(k) === conn) this.conns.delete(k);
  }

  // ---- sockets ----

  /** See `VsockGuest.listen`. */
  listen(port: number, opts: ListenOptions = {}): GuestListener {
    this.#host.checkUsable();
    checkU32("port", port);
    if (this.listeners.has(port)) throw new GuestConnError(`guest port ${port} already listening`);
    const l = new GuestListener(port, this, (x) => this.listeners.delete(x.port), opts.type);
    this.listeners.set(port, l);
    return l;
  }

  /** See `VsockGuest.connect`. */
  async connect(port: number, cid: number, opts: ConnectOptions): Promise<GuestConn> {
    this.#host.checkUsable();
    checkU32("port", port);
    const type = opts.type ?? "stream";
    if (type === "seqpacket" && !this.#negotiated(VIRTIO_VSOCK_F_SEQPACKET)) {
      throw new GuestConnectError(
        `seqpacket connect to ${cid}:${port}: VIRTIO_VSOCK_F_SEQPACKET not negotiated ` +
          `(ESOCKTNOSUPPORT: socket type not supported)`,
        null,
      );
    }
    const local = this.#allocPort(cid, port);
    const conn = new GuestConn(this, local, cid, port, this.#bufAlloc(), "connecting", type);
    this.conns.set(key(local, cid, port), conn);
    this.sendControl(conn, VIRTIO_VSOCK_OP_REQUEST, 0);
    this.flush();
    const timeoutMs = opts.timeoutMs ?? this.#host.opts.connectTimeoutMs ??
      LINUX_CONNECT_TIMEOUT_MS;
    try {
      await this.waitFor(
        () => conn.state !== "connecting",
        timeoutMs,
        `RESPONSE to the REQUEST ${local} -> ${cid}:${port}`,
      );
    } catch (e) {
      if (!(e instanceof GuestTimeoutError)) throw e;
      conn._end("connect-timeout");
      throw new GuestConnectError(
        `connect to ${cid}:${port} failed without a RESPONSE: ${e.message}`,
        "connect-timeout",
      );
    }
    if (conn.state === "established") return conn;
    throw new GuestConnectError(
      `connect to ${cid}:${port} failed: ${conn.closeReason ?? "closed"}` +
        (conn.closeReason === "refused" ? " (RST: connection refused)" : ""),
      conn.closeReason,
    );
  }

  /** See `VsockGuest.bindDgram`. */
  bindDgram(port: number, opts: BindDgramOptions = {}): GuestDgramSocket {
    this.#host.checkUsable();
    checkU32("port", port);
    if (!this.#negotiated(VIRTIO_VSOCK_F_DGRAM)) {
      throw new GuestConnError(
        `bindDgram(${port}): VIRTIO_VSOCK_F_DGRAM not negotiated (ESOCKTNOSUPPORT)`,
      );
    }
    if (this.dgrams.has(port)) throw new GuestConnError(`datagram port ${port} in use`);
    const rcvBuf = opts.rcvBuf ?? this.#host.opts.dgramRcvBuf ?? LINUX_RMEM_DEFAULT;
    const s = new GuestDgramSocket(this, port, rcvBuf);
    this.dgrams.set(port, s);
    return s;
  }

  #bufAlloc(): number {
    return this.#host.opts.bufAlloc ?? LINUX_BUF_ALLOC;
  }

  #negotiated(bit: number): boolean {
    return (this.#host.features() & featureMask(bit)) !== 0n;
  }

  #allocPort(cid: number, port: number): number {
    for (let i = 0; i < 1 << 20; i++) {
      const p = this.#nextPort;
      this.#nextPort = this.#nextPort >= 0xfffffffe ? 1024 : this.#nextPort + 1;
      if (!this.conns.has(key(p, cid, port)) && !this.listeners.has(p)) return p;
    }
    throw new GuestConnError("no free local port");
  }

  // ---- TX ----

  #fillHeader(h: PacketHeader, conn: GuestConn, op: number, flags: number): PacketHeader {
    h.reset();
    h.srcCid = this.#host.cid();
    h.dstCid = conn.peerCid;
    h.srcPort = conn.localPort;
    h.dstPort = conn.peerPort;
    h.type = wireType(conn.type);
    h.op = op;
    h.flags = flags;
    return h;
  }

  /** Queues a header-only packet: placed now if possible, else in the FIFO backlog. */
  #queueControl(conn: GuestConn | null, h: PacketHeader): void {
    if (this.backlog.length === 0 && this.#place(conn, h, null, 0, 0) !== null) return;
    this.backlog.push({ conn, header: h });
  }

  /** Places backlogged header-only packets, in order, while tx buffers are free. */
  drainBacklog(): void {
    while (this.backlog.length > 0) {
      const b = this.backlog[0];
      if (this.#place(b.conn, b.header, null, 0, 0) === null) return;
      this.backlog.shift();
    }
  }

  /**
   * Puts one packet on the tx ring (unpublished): header (stamped with the connection's
   * credit) and bytes[off, off+n). Returns the tx buffer used, or null when no tx buffer or
   * descriptors are free.
   */
  #place(
    conn: GuestConn | null,
    h: PacketHeader,
    bytes: Uint8Array | null,
    off: number,
    n: number,
  ): TxSlot | null {
    const r = this.#host.rings();
    if (r === null) return null;
    if (!r.hasTxRoom(n)) return null;
    if (conn !== null) {
      conn.credit.stamp(h);
      if (h.op === VIRTIO_VSOCK_OP_CREDIT_UPDATE) this.#host.stats.creditUpdatesSent++;
    }
    const slot = r.putTx(h, bytes, off, n);
    if (slot !== null && this.#captures.size > 0) {
      this.#capture("tx", h, n > 0 && bytes !== null ? bytes.subarray(off, off + n) : null);
    }
    return slot;
  }

  /**
   * Places one packet verbatim (no credit accounting, no connection) after the backlog, with
   * `lenField` as the header's len. False when no tx buffer is free.
   */
  placeRaw(r: GuestRings, h: PacketHeader, p: Uint8Array, lenField: number): boolean {
    const maxPayload = r.tx[0].payload.length;
    if (p.length > maxPayload) throw new RangeError(`raw payload > ${maxPayload} bytes`);
    this.drainBacklog();
    if (this.backlog.length > 0) return false;
    const slot = this.#place(null, h, p, 0, p.length);
    if (slot === null) return false;
    // HDR_OFF_LEN: claim a payload length other than the bytes actually chained
    if (lenField !== p.length) slot.hdrView.setUint32(slot.hdrOff + 24, lenField >>> 0, true);
    return true;
  }

  // ---- RX ----

  /** A filled rx buffer: parsed (used len must cover the header and `hdr.len`) and dispatched. */
  onRxBuffer(b: RxBuf, len: number): void {
    if (len < VIRTIO_VSOCK_HDR_SIZE || len > b.bytes.length) {
      this.#anomaly(`rx buffer used with len ${len} (buffer ${b.bytes.length}, header 44)`);
      return;
    }
    const h = this.#rxHdr.decodeFrom(b.view, 0);
    if (h.len > len - VIRTIO_VSOCK_HDR_SIZE) {
      this.#anomaly(`rx packet len ${h.len} exceeds used len ${len} - 44 (${h.describe()})`);
      return;
    }
    this.#host.stats.rxPackets++;
    const payload = b.bytes.subarray(VIRTIO_VSOCK_HDR_SIZE, VIRTIO_VSOCK_HDR_SIZE + h.len);
    if (this.#captures.size > 0) this.#capture("rx", h, payload);
    this.#dispatch(h, payload);
  }

  #dispatch(h: PacketHeader, payload: Uint8Array): void {
    const guestCid = this.#host.cid();
    if (h.dstCidHi !== 0 || h.dstCid !== guestCid) {
      this.#anomaly(`packet for CID ${h.dstCid} reached guest ${guestCid}: ${h.describe()}`);
    }
    if (h.srcCidHi !== 0) this.#anomaly(`src_cid has upper bits set: ${h.describe()}`);
    if (h.len !== 0 && h.op !== VIRTIO_VSOCK_OP_RW) {
      this.#anomaly(`payload on a ${h.op} packet: ${h.describe()}`);
    }
    if (h.type === VIRTIO_VSOCK_TYPE_DGRAM) {
      this.#onDatagram(h, payload);
      return;
    }
    const seqpacket = h.type === VIRTIO_VSOCK_TYPE_SEQPACKET;
    if (!seqpacket && h.type !== VIRTIO_VSOCK_TYPE_STREAM) {
      this.#anomaly(`packet of unsupported type: ${h.describe()}`);
      this.#resetNoSock(h);
      return;
    }
    if (seqpacket && !this.#negotiated(VIRTIO_VSOCK_F_SEQPACKET)) {
      this.#anomaly(
        `packet of unsupported type (SEQPACKET, not negotiated): ${h.describe()}`,
      );
      this.#resetNoSock(h);
      return;
    }
    const conn = this.conns.get(key(h.dstPort, h.srcCid, h.srcPort));
    if (conn === undefined) {
      const l = this.listeners.get(h.dstPort);
      if (l !== undefined && wireType(l.type) === h.type && h.op === VIRTIO_VSOCK_OP_REQUEST) {
        this.#acceptRequest(l, h);
      } else this.#resetNoSock(h);
      return;
    }
    if (wireType(conn.type) !== h.type) {
      // virtio_transport_recv_pkt: the socket's type differs from the packet's
      this.#resetNoSock(h);
      return;
    }
    conn.credit.updateFromPeer(h.bufAlloc, h.fwdCnt);
    if (conn.state === "connecting") {
      if (h.op === VIRTIO_VSOCK_OP_RESPONSE) conn._established();
      else if (h.op === VIRTIO_VSOCK_OP_RST) conn._end("refused");
      else {
        this.#anomaly(`unexpected op while connecting: ${h.describe()}`);
        this.sendControl(conn, VIRTIO_VSOCK_OP_RST, 0);
        conn._end("protocol-error");
      }
      return;
    }
    const closing = conn.state === "closing";
    switch (h.op) {
      case VIRTIO_VSOCK_OP_RW:
        if ((h.len > 0 || seqpacket) && !conn._onData(payload, h.flags)) {
          this.#anomaly(
            `peer sent ${h.len} bytes beyond the credit we gave (${conn.describe()})`,
          );
        }
        if (!closing) this.#host.stats.rxBytes += h.len;
        break;
      case VIRTIO_VSOCK_OP_CREDIT_UPDATE:
        break;
      case VIRTIO_VSOCK_OP_CREDIT_REQUEST:
        if (!closing) this.sendControl(conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0);
        break;
      case VIRTIO_VSOCK_OP_SHUTDOWN:
        if (conn._onShutdown(h.flags)) {
          if (closing) {
            this.sendControl(conn, VIRTIO_VSOCK_OP_RST, 0);
            conn._end("closed");
          } else if (conn.buffered === 0) {
            this.sendControl(conn, VIRTIO_VSOCK_OP_RST, 0);
            conn._end("peer-closed");
          } else {
            // Linux removes the socket from the table at once; data stays readable.
            this.forget(conn);
          }
        }
        break;
      case VIRTIO_VSOCK_OP_RST:
        conn._end(closing ? "closed" : "peer-reset");
        break;
      default:
        this.#anomaly(`unexpected op on an open connection: ${h.describe()}`);
    }
  }

  /** virtio_transport_recv_listen: answer a REQUEST with RESPONSE and queue the connection. */
  #acceptRequest(l: GuestListener, h: PacketHeader): void {
    const conn = new GuestConn(
      this,
      h.dstPort,
      h.srcCid,
      h.srcPort,
      this.#bufAlloc(),
      "established",
      l.type,
    );
    conn.credit.updateFromPeer(h.bufAlloc, h.fwdCnt);
    this.conns.set(key(conn.localPort, conn.peerCid, conn.peerPort), conn);
    this.sendControl(conn, VIRTIO_VSOCK_OP_RESPONSE, 0);
    l._push(conn);
  }

  // ---- datagrams ----

  /** A DGRAM packet: queued on the socket bound to its port, or dropped and counted. */
  #onDatagram(h: PacketHeader, payload: Uint8Array): void {
    const stats = this.#host.stats;
    if (!this.#negotiated(VIRTIO_VSOCK_F_DGRAM)) {
      this.#anomaly(`DGRAM packet without VIRTIO_VSOCK_F_DGRAM: ${h.describe()}`);
      return;
    }
    if (h.op !== VIRTIO_VSOCK_OP_RW) {
      stats.dgramRxInvalid++;
      this.#anomaly(`DGRAM packet with op ${h.op} (only RW is valid): ${h.describe()}`);
      return;
    }
    const s = this.dgrams.get(h.dstPort);
    if (s === undefined) stats.dgramRxNoSocket++;
    else if (s._deliver(h.srcCid, h.srcPort, payload)) stats.rxBytes += h.len;
    else stats.dgramRxDropped++;
  }

  get maxDatagram(): number {
    return Math.min(this.#host.opts.maxPacketPayload ?? MAX_PKT_PAYLOAD, MAX_PKT_PAYLOAD);
  }

  canSendDatagram(len: number): boolean {
    const r = this.#host.rings();
    return r !== null && this.backlog.length === 0 && r.hasTxRoom(len);
  }

  sendDatagram(sock: GuestDgramSocket, cid: number, port: number, bytes: Uint8Array): boolean {
    this.#host.checkUsable();
    if (!this.canSendDatagram(bytes.length)) return false;
    const h = this.#txHdr.reset();
    h.srcCid = this.#host.cid();
    h.dstCid = cid;
    h.srcPort = sock.port;
    h.dstPort = port;
    h.type = VIRTIO_VSOCK_TYPE_DGRAM;
    h.op = VIRTIO_VSOCK_OP_RW;
    // no connection: no credit stamped (buf_alloc and fwd_cnt stay 0)
    return this.#place(null, h, bytes, 0, bytes.length) !== null;
  }

  unbind(sock: GuestDgramSocket): void {
    if (this.dgrams.get(sock.port) === sock) this.dgrams.delete(sock.port);
  }

  /** virtio_transport_reset_no_sock: RST back, unless the packet is an RST. */
  #resetNoSock(h: PacketHeader): void {
    if (h.op === VIRTIO_VSOCK_OP_RST) return;
    this.#queueControl(null, resetReplyFor(h));
  }

  /** Ends every connection without packets (TRANSPORT_RESET, driver reset). */
  dropConnections(reason: GuestCloseReason): void {
    for (const c of [...this.conns.values()]) c._end(reason);
    // Packets of dropped connections still waiting for a tx buffer are dropped too.
    for (let i = this.backlog.length - 1; i >= 0; i--) {
      if (this.backlog[i].conn !== null) this.backlog.splice(i, 1);
    }
    for (const l of this.listeners.values()) l._prune();
  }

  #anomaly(what: string): void {
    this.#host.anomalies.push(what);
  }

  // ---- capture ----

  /** See `VsockGuest.capture`. */
  capture(): PacketCapture {
    const packets: CapturedPacket[] = [];
    this.#captures.add(packets);
    return { packets, stop: () => this.#captures.delete(packets) };
  }

  #capture(direction: "rx" | "tx", h: PacketHeader, payload: Uint8Array | null): void {
    for (const list of this.#captures) {
      list.push({
        direction,
        header: new PacketHeader().copyFrom(h),
        payload: payload === null ? new Uint8Array(0) : payload.slice(),
      });
    }
  }
}

function key(localPort: number, peerCid: number, peerPort: number): string {
  return `${localPort}:${peerCid}:${peerPort}`;
}
