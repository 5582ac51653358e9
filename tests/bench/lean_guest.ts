/**
 * The benchmark's guest: a virtio-vsock driver as cheap as a kernel one, so the benchmark
 * measures the back end and not an emulated guest. It plays Linux's `virtio_transport.c` and
 * `virtio_transport_common.c` for stream sockets over the `lib/testing` VMM front end
 * (`VhostUserFrontEnd`, which speaks vhost-user to the back end) and guest RAM:
 *
 * - probe: the features Linux keeps (VERSION_1, EVENT_IDX, INDIRECT_DESC, RING_PACKED when the
 *   VMM offers it: `packed`; DGRAM when offered), guest_cid from the config space, rings and
 *   buffers laid out by lean_rings.ts, DRIVER_OK, rx and event queues filled;
 * - zero-copy tx: RW payload is referenced from the payload pool in guest RAM (`sendPool`);
 *   only payload that is not there (echo replies) is copied into the tx slot (`sendCopy`);
 * - rx: each RW payload is handed to the connection's `onData` as a view of the rx buffer
 *   (checked by samples or completely, never copied), then "read" by the application at the
 *   end of the batch: fwd_cnt advances and a CREDIT_UPDATE goes out by Linux's rule in
 *   `virtio_transport_stream_do_dequeue` (once the peer may see less than 64 KiB free, or the
 *   read emptied the queue);
 * - credit: every header carries our buf_alloc / fwd_cnt; RW payload never exceeds the peer's
 *   free credit; CREDIT_REQUEST is answered; data beyond our credit is dropped and recorded;
 * - datagrams (the 2022 RFC's VIRTIO_VSOCK_F_DGRAM, acked when offered): each DGRAM packet is
 *   counted for its destination port (`bindDgram`) and its rx buffer recycled at once, like a
 *   socket whose application reads and discards;
 * - connections: REQUEST / RESPONSE, listeners (REQUEST answered with RESPONSE), SHUTDOWN
 *   flags sticky, a peer that shut down both ways gets an RST, close = SHUTDOWN(both) then
 *   wait for the RST, RST for packets to no socket; header-only packets that find no tx slot
 *   wait in a FIFO backlog, drained before data is sent.
 *
 * The driver does nothing on its own: `pump()` processes the rings without blocking and
 * `wait(ms)` blocks in poll(2) on the call eventfds. Anything the back end does that Linux
 * would drop or that breaks the spec goes to `anomalies`.
 */

import { sys } from "../../ffi/libc.ts";
import { POLLERR, POLLHUP, POLLIN } from "../../ffi/mod.ts";
import { type FrontEndProfile, VhostUserFrontEnd } from "../../lib/testing/front_end.ts";
import { ringFeatures } from "../../lib/testing/driver_rings.ts";
import { GUEST_DRIVER_FEATURES } from "../../lib/testing/guest_driver.ts";
import { featureMask } from "../../lib/virtio/features.ts";
import {
  MAX_PKT_PAYLOAD,
  VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
  VIRTIO_VSOCK_F_DGRAM,
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
  VIRTIO_VSOCK_TYPE_DGRAM,
  VIRTIO_VSOCK_TYPE_STREAM,
  VSOCK_HOST_CID,
} from "../../lib/vsock/constants.ts";
import { Credit } from "../../lib/vsock/credit.ts";
import { PacketHeader, resetReplyFor } from "../../lib/vsock/packet.ts";
import { INLINE_MAX, LeanRings } from "./lean_rings.ts";
import { now } from "./stream_clock.ts";
import { PATTERN_PERIOD } from "./pattern.ts";

/** Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE: largest RW payload, and the credit-update mark. */
const MAX_PKT_BUF_SIZE = MAX_PKT_PAYLOAD;

/** Where a connection is in its life. */
export type LeanState = "connecting" | "established" | "closing" | "closed";

/** One guest stream socket. */
export class LeanConn {
  state: LeanState;
  closeReason: string | null = null;
  readonly credit: Credit;
  peerShutdown = 0;
  localShutdown = 0;
  bytesReceived = 0;
  bytesSent = 0;
  /** each received RW payload, as a view of the rx buffer valid during the call */
  onData: ((payload: Uint8Array) => void) | null = null;
  /** @internal received data in the current rx batch (the application reads it after) */
  unread = false;

  constructor(
    readonly localPort: number,
    readonly peerCid: number,
    readonly peerPort: number,
    bufAlloc: number,
    state: LeanState,
  ) {
    this.credit = new Credit(bufAlloc);
    this.state = state;
  }

  /** No more data will arrive (peer SHUTDOWN(send), or the connection ended). */
  get eof(): boolean {
    return (this.peerShutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND) !== 0 || this.state === "closed";
  }

  get closed(): boolean {
    return this.state === "closed";
  }

  describe(): string {
    return `${this.localPort} -> ${this.peerCid}:${this.peerPort} (${this.state}` +
      `${this.closeReason ? `, ${this.closeReason}` : ""}, peer free ${this.credit.peerFree()}, ` +
      `sent ${this.bytesSent}, received ${this.bytesReceived})`;
  }
}

/** A listening port: connections the driver accepted wait in `pending`. */
export class LeanListener {
  readonly pending: LeanConn[] = [];
  constructor(readonly port: number) {}
}

/** A bound datagram port: counts what arrives (the application reads and discards). */
export class LeanDgramSocket {
  datagrams = 0;
  bytes = 0;
  constructor(readonly port: number) {}
}

/** Options of `LeanGuest.boot`. */
export interface LeanGuestOptions {
  readonly profile: FrontEndProfile;
  readonly queueSize: number;
  /** payload bytes per rx buffer (Linux: 4096) */
  readonly rxBufSize: number;
  /** buf_alloc we advertise (Linux: 256 KiB) */
  readonly bufAlloc: number;
  readonly ramMiB: number;
  /** the payload pool's content (copied into guest RAM once) */
  readonly pool: Uint8Array;
  /** packed virtqueues: the VMM offers VIRTIO_F_RING_PACKED, the back end must have it */
  readonly packed?: boolean;
}

/** Counters. */
export interface LeanStats {
  kicks: number[];
  interrupts: number[];
  rxPackets: number;
  /** DGRAM packets received (to a bound port or not) */
  rxDgrams: number;
  txPackets: number;
  creditUpdatesSent: number;
  polls: number;
}

/** The driver. */
export class LeanGuest {
  readonly stats: LeanStats = {
    kicks: [0, 0, 0],
    interrupts: [0, 0, 0],
    rxPackets: 0,
    rxDgrams: 0,
    txPackets: 0,
    creditUpdatesSent: 0,
    polls: 0,
  };
  readonly anomalies: string[] = [];
  readonly conns = new Map<string, LeanConn>();
  readonly #listeners = new Map<number, LeanListener>();
  readonly #dgramPorts = new Map<number, LeanDgramSocket>();
  readonly #backlog: { conn: LeanConn | null; h: PacketHeader }[] = [];
  readonly #unread: LeanConn[] = [];
  readonly #rxHdr = new PacketHeader();
  readonly #txHdr = new PacketHeader();
  #last: LeanConn | null = null;
  #nextPort = 1024;
  readonly #dgramAcked: boolean;
  readonly #pfd: Int32Array;
  readonly #pfdBytes: Uint8Array;
  readonly #rev: Int16Array;
  readonly #nfds: bigint;

  private constructor(
    readonly fe: VhostUserFrontEnd,
    readonly rings: LeanRings,
    readonly guestCid: number,
    readonly features: bigint,
    readonly bufAlloc: number,
  ) {
    const fds = [...fe.callFds, fe.socketFd];
    this.#pfd = new Int32Array(fds.length * 2);
    this.#rev = new Int16Array(this.#pfd.buffer);
    for (let i = 0; i < fds.length; i++) {
      this.#pfd[2 * i] = fds[i];
      this.#rev[4 * i + 2] = i < fe.callFds.length ? POLLIN : 0;
    }
    this.#pfdBytes = new Uint8Array(this.#pfd.buffer);
    this.#nfds = BigInt(fds.length);
    this.#dgramAcked = (features & featureMask(VIRTIO_VSOCK_F_DGRAM)) !== 0n;
  }

  /** Connects the VMM front end to the back end at `socket` and probes the device. */
  static async boot(socket: string, o: LeanGuestOptions): Promise<LeanGuest> {
    const fe = await VhostUserFrontEnd.connect(socket, {
      profile: o.profile,
      queueSize: o.queueSize,
      regions: [{ gpa: 0, size: o.ramMiB * 1024 * 1024 }],
      packed: o.packed ?? false,
    });
    const features = fe.deviceFeatures() & GUEST_DRIVER_FEATURES;
    const rings = new LeanRings(fe.memory, o.queueSize, {
      ...ringFeatures(features),
      rxBufSize: o.rxBufSize,
      pool: o.pool,
    });
    const g = new LeanGuest(fe, rings, fe.readGuestCid(), features, o.bufAlloc);
    fe.startDevice(features, rings.setups);
    rings.fill();
    g.flush();
    return g;
  }

  // ---- sockets ------------------------------------------------------------------------

  /** Sends REQUEST to `cid:port`; drive until `state` is no longer "connecting". */
  connect(port: number, cid = VSOCK_HOST_CID): LeanConn {
    let local = this.#nextPort;
    while (this.conns.has(key(local, cid, port)) || this.#listeners.has(local)) local++;
    this.#nextPort = local + 1;
    const c = new LeanConn(local, cid, port, this.bufAlloc, "connecting");
    this.conns.set(key(local, cid, port), c);
    this.#control(c, VIRTIO_VSOCK_OP_REQUEST, 0);
    this.flush();
    return c;
  }

  listen(port: number): LeanListener {
    const l = new LeanListener(port);
    this.#listeners.set(port, l);
    return l;
  }

  unlisten(l: LeanListener): void {
    this.#listeners.delete(l.port);
    for (const c of l.pending.splice(0)) this.reset(c);
  }

  /** Binds datagram port `port` (its datagrams are counted there). */
  bindDgram(port: number): LeanDgramSocket {
    const s = new LeanDgramSocket(port);
    this.#dgramPorts.set(port, s);
    return s;
  }

  unbindDgram(s: LeanDgramSocket): void {
    this.#dgramPorts.delete(s.port);
  }

  /** Payload bytes one RW packet of `c` may carry now (0: no credit, slot or descriptors). */
  sendRoom(c: LeanConn): number {
    if (c.state !== "established" || this.#backlog.length > 0 || !this.rings.txRoom(true)) {
      return 0;
    }
    if ((c.localShutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND) !== 0) return 0;
    const free = c.credit.peerFree();
    return free < MAX_PKT_BUF_SIZE ? free : MAX_PKT_BUF_SIZE;
  }

  /**
   * One RW packet of `n` bytes (n <= sendRoom) whose payload is the pool at stream position
   * `pos` (taken modulo the pattern period): no copy.
   */
  sendPool(c: LeanConn, pos: number, n: number): void {
    const s = this.#putHeader(c, VIRTIO_VSOCK_OP_RW, 0, n);
    this.rings.putTx(s, this.rings.poolGpa + (pos % PATTERN_PERIOD), n);
    this.#sent(c, n);
  }

  /** One RW packet carrying a copy of `bytes` (length <= sendRoom and <= INLINE_MAX). */
  sendCopy(c: LeanConn, bytes: Uint8Array): void {
    const n = bytes.length;
    if (n > INLINE_MAX) throw new RangeError(`sendCopy: ${n} bytes > ${INLINE_MAX}`);
    const s = this.#putHeader(c, VIRTIO_VSOCK_OP_RW, 0, n);
    this.rings.txInline(s).set(bytes);
    this.rings.putTx(s, -1, n);
    this.#sent(c, n);
  }

  #sent(c: LeanConn, n: number): void {
    c.credit.consumeTx(n);
    c.bytesSent += n;
    this.stats.txPackets++;
  }

  /** shutdown(2): SHUTDOWN with `flags` (sticky). */
  shutdown(c: LeanConn, flags: number): void {
    if (c.state !== "established") return;
    c.localShutdown |= flags;
    this.#control(c, VIRTIO_VSOCK_OP_SHUTDOWN, c.localShutdown);
    this.flush();
  }

  /** close(2): SHUTDOWN(both), then the peer's RST ends it (drive until `closed`). */
  close(c: LeanConn): void {
    if (c.state === "closed" || c.state === "closing") return;
    if (c.state === "connecting") return this.reset(c);
    c.localShutdown = VIRTIO_VSOCK_SHUTDOWN_F_BOTH;
    this.#control(c, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_F_BOTH);
    c.state = "closing";
    this.flush();
  }

  /** Sends RST and ends the connection now. */
  reset(c: LeanConn, reason = "local-reset"): void {
    if (c.state === "closed") return;
    this.#control(c, VIRTIO_VSOCK_OP_RST, 0);
    this.#end(c, reason);
    this.flush();
  }

  // ---- rings ----------------------------------------------------------------------------

  /** epoch ms when the current (or last) `pump` began: the guest's "interrupt" time */
  pumpStartedAt = 0;

  /**
   * Processes everything pending without blocking: tx slots recycled, rx packets dispatched,
   * data read by the application (credit updates), events, backlog, rx refill, kicks.
   * Returns the used elements processed.
   */
  pump(): number {
    this.pumpStartedAt = now();
    const r = this.rings;
    const anomaly = (what: string) => this.#anomaly(what);
    let n = r.reapTx(anomaly);
    n += r.reapRx((i, len) => this.#onRx(i, len), anomaly);
    for (const c of this.#unread) this.#read(c);
    this.#unread.length = 0;
    n += r.reapEvents((id) => this.#onEvent(id));
    this.#drainBacklog();
    r.maybeRefillRx();
    this.flush();
    return n;
  }

  /** Publishes new buffers and kicks where the device asks for it. */
  flush(): void {
    this.rings.flush((i) => {
      this.stats.kicks[i]++;
      this.fe.kick(i);
    });
  }

  /** Blocks in poll(2) until a call eventfd fires or `timeoutMs` passes; true if one fired. */
  wait(timeoutMs: number): boolean {
    this.stats.polls++;
    const n = sys.poll(this.#pfdBytes, this.#nfds, timeoutMs);
    if (n <= 0) return false;
    const calls = this.fe.callFds.length;
    let fired = false;
    for (let i = 0; i < calls; i++) {
      if (this.#rev[4 * i + 3] & POLLIN) {
        this.fe.takeCall(i);
        this.stats.interrupts[i]++;
        fired = true;
      }
    }
    if (this.#rev[4 * calls + 3] & (POLLHUP | POLLERR)) {
      throw new Error(`the back end closed the vhost-user socket; ${this.describe()}`);
    }
    return fired;
  }

  /** Interrupts so far (all queues). */
  get interrupts(): number {
    const i = this.stats.interrupts;
    return i[0] + i[1] + i[2];
  }

  /** Kicks (queue notifications to the device) so far (all queues). */
  get kicks(): number {
    const k = this.stats.kicks;
    return k[0] + k[1] + k[2];
  }

  describe(): string {
    return `guest cid ${this.guestCid}: ${this.rings.describe()}; backlog ${this.#backlog.length}` +
      `; conns ${[...this.conns.values()].map((c) => c.describe()).join(", ")}`;
  }

  // ---- rx -------------------------------------------------------------------------------

  #onRx(i: number, len: number): void {
    const view = this.rings.rxViews[i];
    if (len < VIRTIO_VSOCK_HDR_SIZE || len > view.byteLength) {
      return this.#anomaly(`rx buffer used with len ${len} (buffer ${view.byteLength})`);
    }
    const h = this.#rxHdr.decodeFrom(view, 0);
    if (h.len > len - VIRTIO_VSOCK_HDR_SIZE) {
      return this.#anomaly(`rx packet len ${h.len} exceeds used len ${len} - 44`);
    }
    this.stats.rxPackets++;
    if (h.dstCid !== this.guestCid || h.dstCidHi !== 0 || h.srcCidHi !== 0) {
      this.#anomaly(`packet for CID ${h.dstCid} reached guest ${this.guestCid}: ${h.describe()}`);
    }
    if (h.type === VIRTIO_VSOCK_TYPE_DGRAM && this.#dgramAcked) {
      // No connection, no credit, no reply: count it; the buffer is re-posted by the caller.
      this.stats.rxDgrams++;
      const s = this.#dgramPorts.get(h.dstPort);
      if (s !== undefined && h.op === VIRTIO_VSOCK_OP_RW) {
        s.datagrams++;
        s.bytes += h.len;
      }
      return;
    }
    if (h.type !== VIRTIO_VSOCK_TYPE_STREAM) {
      this.#anomaly(`packet of unsupported type: ${h.describe()}`);
      return this.#resetNoSock(h);
    }
    let c = this.#last;
    if (
      c === null || c.localPort !== h.dstPort || c.peerPort !== h.srcPort || c.peerCid !== h.srcCid
    ) {
      c = this.conns.get(key(h.dstPort, h.srcCid, h.srcPort)) ?? null;
      if (c === null) {
        const l = this.#listeners.get(h.dstPort);
        if (l !== undefined && h.op === VIRTIO_VSOCK_OP_REQUEST) this.#accept(l, h);
        else this.#resetNoSock(h);
        return;
      }
      this.#last = c;
    }
    c.credit.updateFromPeer(h.bufAlloc, h.fwdCnt);
    if (c.state === "connecting") {
      if (h.op === VIRTIO_VSOCK_OP_RESPONSE) c.state = "established";
      else if (h.op === VIRTIO_VSOCK_OP_RST) this.#end(c, "refused");
      else {
        this.#anomaly(`unexpected op while connecting: ${h.describe()}`);
        this.reset(c, "protocol-error");
      }
      return;
    }
    switch (h.op) {
      case VIRTIO_VSOCK_OP_RW: {
        if (c.state === "closing" || h.len === 0) return; // Linux drops data while closing
        if (!c.credit.onReceived(h.len)) {
          return this.#anomaly(`peer sent ${h.len} bytes beyond our credit (${c.describe()})`);
        }
        c.bytesReceived += h.len;
        if (c.onData !== null) {
          const b = this.rings.rxBytes[i];
          c.onData(b.subarray(VIRTIO_VSOCK_HDR_SIZE, VIRTIO_VSOCK_HDR_SIZE + h.len));
        }
        if (!c.unread) {
          c.unread = true;
          this.#unread.push(c);
        }
        return;
      }
      case VIRTIO_VSOCK_OP_CREDIT_UPDATE:
        return;
      case VIRTIO_VSOCK_OP_CREDIT_REQUEST:
        if (c.state === "established") this.#control(c, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0);
        return;
      case VIRTIO_VSOCK_OP_SHUTDOWN:
        c.peerShutdown |= h.flags & VIRTIO_VSOCK_SHUTDOWN_F_BOTH;
        if (c.peerShutdown === VIRTIO_VSOCK_SHUTDOWN_F_BOTH) {
          // Linux: nothing unread (the application reads at once) -> RST, done.
          this.#control(c, VIRTIO_VSOCK_OP_RST, 0);
          this.#end(c, c.state === "closing" ? "closed" : "peer-closed");
        }
        return;
      case VIRTIO_VSOCK_OP_RST:
        return this.#end(c, c.state === "closing" ? "closed" : "peer-reset");
      default:
        this.#anomaly(`unexpected op on an open connection: ${h.describe()}`);
    }
  }

  /** The application reads everything received (virtio_transport_stream_do_dequeue). */
  #read(c: LeanConn): void {
    c.unread = false;
    const cr = c.credit;
    const n = cr.buffered();
    if (n > 0) cr.onForwarded(n);
    if (c.state !== "established") return;
    const delta = (cr.fwdCnt - cr.lastSentFwdCnt) >>> 0;
    // free < 64 KiB, or the queue is empty (it is: low_rx_bytes with SO_RCVLOWAT 1)
    if (delta !== 0) this.#control(c, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0);
  }

  #accept(l: LeanListener, h: PacketHeader): void {
    const c = new LeanConn(h.dstPort, h.srcCid, h.srcPort, this.bufAlloc, "established");
    c.credit.updateFromPeer(h.bufAlloc, h.fwdCnt);
    this.conns.set(key(c.localPort, c.peerCid, c.peerPort), c);
    this.#control(c, VIRTIO_VSOCK_OP_RESPONSE, 0);
    l.pending.push(c);
  }

  #onEvent(id: number): void {
    if (id !== VIRTIO_VSOCK_EVENT_TRANSPORT_RESET) return this.#anomaly(`unknown event ${id}`);
    for (const c of [...this.conns.values()]) this.#end(c, "transport-reset");
    for (let i = this.#backlog.length - 1; i >= 0; i--) {
      if (this.#backlog[i].conn !== null) this.#backlog.splice(i, 1);
    }
  }

  #end(c: LeanConn, reason: string): void {
    if (c.state === "closed") return;
    c.state = "closed";
    c.closeReason = reason;
    this.conns.delete(key(c.localPort, c.peerCid, c.peerPort));
    if (this.#last === c) this.#last = null;
  }

  // ---- tx -------------------------------------------------------------------------------

  /** Fills `h` as a packet of `c` with `op` and `flags` (credit not stamped yet). */
  #fill(h: PacketHeader, c: LeanConn, op: number, flags: number): PacketHeader {
    h.reset();
    h.srcCid = this.guestCid;
    h.dstCid = c.peerCid;
    h.srcPort = c.localPort;
    h.dstPort = c.peerPort;
    h.type = VIRTIO_VSOCK_TYPE_STREAM;
    h.op = op;
    h.flags = flags;
    return h;
  }

  /** Takes a tx slot and writes the header of `c` (stamped with our credit); the slot. */
  #putHeader(c: LeanConn, op: number, flags: number, len: number): number {
    const h = this.#fill(this.#txHdr, c, op, flags);
    h.len = len;
    c.credit.stamp(h);
    const s = this.rings.txSlot();
    h.encodeTo(this.rings.txHeader(s), 0);
    return s;
  }

  /** A header-only packet of `c`: on the ring now, or after the backlog. */
  #control(c: LeanConn, op: number, flags: number): void {
    if (op === VIRTIO_VSOCK_OP_CREDIT_UPDATE) this.stats.creditUpdatesSent++;
    if (this.#backlog.length === 0 && this.rings.txRoom(false)) {
      this.rings.putTx(this.#putHeader(c, op, flags, 0), 0, 0);
      return;
    }
    this.#backlog.push({ conn: c, h: this.#fill(new PacketHeader(), c, op, flags) });
  }

  /** virtio_transport_reset_no_sock: RST back, unless the packet is an RST. */
  #resetNoSock(h: PacketHeader): void {
    if (h.op === VIRTIO_VSOCK_OP_RST) return;
    this.#backlog.push({ conn: null, h: resetReplyFor(h) });
    this.#drainBacklog();
  }

  #drainBacklog(): void {
    while (this.#backlog.length > 0 && this.rings.txRoom(false)) {
      const { conn, h } = this.#backlog.shift()!;
      if (conn !== null) conn.credit.stamp(h);
      h.len = 0;
      const s = this.rings.txSlot();
      h.encodeTo(this.rings.txHeader(s), 0);
      this.rings.putTx(s, 0, 0);
    }
  }

  #anomaly(what: string): void {
    if (this.anomalies.length < 100) this.anomalies.push(what);
  }
}

/** Connection-table key. */
function key(localPort: number, peerCid: number, peerPort: number): string {
  return `${localPort}:${peerCid}:${peerPort}`;
}

export { VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE, VIRTIO_VSOCK_SHUTDOWN_F_SEND };
