/**
 * The muxer: routes vsock packets between the guest, host applications and sibling VMs
 * (Firecracker's `unix/muxer.rs` plays the same part).
 *
 * Guest -> host (tx), for each validated guest packet:
 * - `src_cid` must be the guest's CID: a packet "from" another CID is dropped (an RST "from"
 *   its destination would end the guest's real connection on those ports), as Linux's
 *   vhost-vsock does; other malformed headers get an RST;
 * - an unknown socket type gets an RST;
 * - a packet for another guest CID goes to the sibling VM sharing a group, or gets an RST;
 * - a packet for CID 2 goes to its connection (keyed by host port, guest port); a REQUEST
 *   with no connection connects to `<uds_path>_<port>` (RST if nothing listens there or the
 *   connection limit is reached); anything else with no connection gets an RST.
 *
 * Host -> guest: a host app that completed `CONNECT <port>\n` on `<uds_path>` (see
 * `host_listener.ts`) becomes a host-initiated connection with a local port allocated from
 * [2^30, 2^31) that no open connection uses; the guest is sent a REQUEST.
 *
 * Rx buffers are shared out by the RX scheduler (`rx_scheduler.ts`): orphan RSTs first,
 * then sibling packets and connections taking turns.
 */
import {
  close,
  connectUnix,
  MessageIo,
  setSockOptInt,
  SO_SNDBUF,
  SOCK_SEQPACKET,
  SOCK_STREAM,
  SysError,
} from "../../ffi/mod.ts";
import { log, LogLimiter } from "../log.ts";
import type { Reactor } from "../reactor.ts";
import type { DescChain } from "../virtio/desc_chain.ts";
import { ConnectionTable } from "./connection_table.ts";
import { type ConnectionContext, ConnState, Pending, VsockConnection } from "./connection.ts";
import {
  DEFAULT_BUF_ALLOC,
  opName,
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RST,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_TYPE_DGRAM,
  VIRTIO_VSOCK_TYPE_SEQPACKET,
  VIRTIO_VSOCK_TYPE_STREAM,
  VSOCK_HOST_CID,
} from "./constants.ts";
import { type DgramContext, DgramEndpoint, type DgramStats } from "./dgram.ts";
import { HostListener } from "./host_listener.ts";
import { HeaderError, HeaderScratch, type PacketHeader, validateHeader } from "./packet.ts";
import { AUTOTUNE_DEFAULT_BUDGET, WindowAutotune } from "./autotune.ts";
import type { RxChainSource } from "./rx_batch.ts";
import { type RxFlow, RxScheduler } from "./rx_scheduler.ts";
import { type SiblingEndpoint, SiblingHub, type SiblingPacket } from "./sibling_hub.ts";
import { SiblingInbox } from "./sibling_inbox.ts";
import type { DeviceStats } from "./stats.ts";
import { TxGather } from "./tx_gather.ts";

/** How a device is configured (one VM). */
export interface VsockDeviceOptions {
  guestCid: number;
  /** hybrid vsock socket of the host side */
  udsPath: string;
  /** per-connection guest->host buffer, advertised to the guest as buf_alloc */
  txBufferSize: number;
  /** largest queue size accepted */
  queueSize: number;
  connectTimeoutMs: number;
  maxConnections: number;
  /** sibling groups (`--groups`); VMs of one daemon sharing a group reach each other */
  groups?: readonly string[];
  /** the daemon's switch between sibling VMs */
  hub?: SiblingHub;
  /** offer datagram sockets (`--dgram`: VIRTIO_VSOCK_F_DGRAM, feature bit 3) */
  datagrams?: boolean;
  /** RX scheduler weight per guest port (`--rx-weight PORT=N`); others weigh 1 */
  rxWeights?: ReadonlyMap<number, number>;
  /** grow receive windows while host apps keep up (default true; `--no-autotune`) */
  autotune?: boolean;
  /** budget of grown receive windows (`--max-buffer-memory`) */
  maxBufferMemory?: number;
}

/** Suffix of the seqpacket twin of `<uds_path>` (host-initiated seqpacket connections). */
export const SEQPACKET_SUFFIX = ".seqpacket";

/** Most iovecs one packet's payload may use. */
const MAX_IOV = 64;
/** First port of the range host-initiated connections get (Firecracker's choice). */
const HOST_PORT_FIRST = 1 << 30;
/** End (exclusive) of that range. */
const HOST_PORT_END = 2 ** 31;

export class VsockMuxer implements ConnectionContext, DgramContext, SiblingEndpoint {
  reactor!: Reactor;
  readonly gather: TxGather = new TxGather();
  readonly iov: BigUint64Array = new BigUint64Array(2 * MAX_IOV);
  readonly msgIo: MessageIo = new MessageIo();
  /** set by the device around each rx buffer fill (multi-buffer reads) */
  rxChains: RxChainSource | null = null;
  readonly autotune: WindowAutotune | null;
  readonly scratch: HeaderScratch = new HeaderScratch();
  readonly header: PacketHeader = this.scratch.h;
  readonly scheduler: RxScheduler = new RxScheduler();
  readonly #inbox: SiblingInbox;
  readonly #conns = new ConnectionTable();
  #host: HostListener | null = null;
  #seqpacketHost: HostListener | null = null;
  /** datagrams, with `--dgram` */
  #dgram: DgramEndpoint | null = null;
  #dgramAcked = false;

  /** the driver acked VIRTIO_VSOCK_F_DGRAM */
  get dgramAcked(): boolean {
    return this.#dgramAcked;
  }

  set dgramAcked(acked: boolean) {
    this.#dgramAcked = acked;
    if (acked) this.#dgram?.resume(); // reading paused while no driver took datagrams
  }
  /** malformed packets seen */
  #badPackets = 0;
  readonly #eventLog = new LogLimiter("vsock: connection events", 50, 5000, "info");
  readonly #faultLog = new LogLimiter("vsock: peer faults", 20, 5000, "warn");
  #nextHostPort = HOST_PORT_FIRST;
  /** guest ports host apps reached (listeners the driver keeps across a transport reset) */
  readonly guestListenerPorts: Set<number> = new Set<number>();
  /** connections opened around a VMM-delivered transport reset (see `restore.ts`) */
  #window: Set<VsockConnection> | null = null;

  constructor(
    readonly options: VsockDeviceOptions,
    readonly stats: DeviceStats,
    /** asks the device to run its rx loop at the end of this reactor batch */
    readonly requestRx: () => void,
  ) {
    this.#inbox = new SiblingInbox(options.guestCid, this.scratch, (f) => this.#scheduleFlow(f));
    this.autotune = options.autotune === false
      ? null
      : new WindowAutotune(options.maxBufferMemory ?? AUTOTUNE_DEFAULT_BUDGET);
  }

  #scheduleFlow(f: RxFlow): void {
    this.scheduler.schedule(f);
    this.requestRx();
  }

  get guestCid(): number {
    return this.options.guestCid;
  }

  get groups(): readonly string[] {
    return this.options.groups ?? [];
  }

  get connectionCount(): number {
    return this.#conns.size;
  }

  /** Starts serving host apps on `<uds_path>` and joins the sibling switch. */
  attach(reactor: Reactor): void {
    this.reactor = reactor;
    this.#host = new HostListener(
      reactor,
      this.options.udsPath,
      (fd, port, early) => this.#hostConnect(fd, port, early, VIRTIO_VSOCK_TYPE_STREAM),
      this.options.connectTimeoutMs,
    );
    this.#host.listen();
    this.#seqpacketHost = new HostListener(
      reactor,
      `${this.options.udsPath}${SEQPACKET_SUFFIX}`,
      (fd, port, early) => this.#hostConnect(fd, port, early, VIRTIO_VSOCK_TYPE_SEQPACKET),
      this.options.connectTimeoutMs,
      SOCK_SEQPACKET,
    );
    this.#seqpacketHost.listen();
    if (this.options.datagrams) {
      this.#dgram = new DgramEndpoint(this, this.options.udsPath);
      this.#dgram.listen();
    }
    this.options.hub?.register(this);
  }

  // --- ConnectionContext ---------------------------------------------------------------------

  emit(chain: DescChain): void {
    this.scratch.writeTo(chain);
    if (log.traceOn) {
      log.trace(`vsock: rx ${this.header.describe()} op=${opName(this.header.op)}`);
    }
  }

  scheduleRx(c: VsockConnection): void {
    this.#scheduleFlow(c);
  }

  scheduleFlow(f: RxFlow): void {
    this.#scheduleFlow(f);
  }

  /** The RX scheduler weight of flows toward guest port `port` (`--rx-weight`). */
  weightOf(port: number): number {
    return this.options.rxWeights?.get(port) ?? 1;
  }

  /** Datagram counters (null without `--dgram`). */
  get dgramStats(): DgramStats | null {
    return this.#dgram?.stats ?? null;
  }

  forget(c: VsockConnection): void {
    this.#conns.delete(c);
  }

  guestAccepted(port: number): void {
    this.guestListenerPorts.add(port);
  }

  logEvent(msg: string): void {
    if (this.#eventLog.allow()) log.info(msg);
  }

  logFault(msg: string): void {
    if (this.#faultLog.allow()) log.warn(msg);
  }

  // --- guest -> host -------------------------------------------------------------------------

  /** Routes one guest packet (a chain with at least a header's worth of readable bytes). */
  txPacket(chain: DescChain): void {
    const h = this.scratch.readFrom(chain);
    const gathering = this.gather.conn;
    if (
      gathering !== null &&
      (h.op !== VIRTIO_VSOCK_OP_RW || h.dstPort !== gathering.localPort ||
        h.srcPort !== gathering.peerPort)
    ) {
      this.gather.flush();
    }
    this.stats.txPackets++;
    if (log.traceOn) log.trace(`vsock: tx ${h.describe()}`);
    const bad = validateHeader(h, this.options.guestCid, chain.readableLen - VIRTIO_VSOCK_HDR_SIZE);
    if (bad !== null) {
      this.#badPackets++;
      this.logFault(
        `vsock: bad packet from guest (${bad}; ${this.#badPackets} so far): ${h.describe()}`,
      );
      // A packet that is not from this guest's CID is dropped, as Linux's vhost-vsock does:
      // an RST "from" its destination would end the guest's real connection on those ports.
      if (bad === HeaderError.SRC_CID || bad === HeaderError.SRC_CID_HIGH) return;
      if (h.op !== VIRTIO_VSOCK_OP_RST) this.orphanReset(h);
      return;
    }
    if (h.type === VIRTIO_VSOCK_TYPE_DGRAM && this.#dgram !== null && this.dgramAcked) {
      this.#guestDatagram(h, chain);
      return;
    }
    if (h.type !== VIRTIO_VSOCK_TYPE_STREAM && h.type !== VIRTIO_VSOCK_TYPE_SEQPACKET) {
      if (log.debugOn) log.debug(`vsock: unsupported socket type ${h.type}; RST`);
      if (h.op !== VIRTIO_VSOCK_OP_RST) this.orphanReset(h);
      return;
    }
    if (h.dstCid !== VSOCK_HOST_CID) {
      this.#toSibling(h, chain);
      return;
    }
    const c = this.#conns.get(h.dstPort, h.srcPort);
    if (c !== undefined && c.type !== h.type) {
      // A packet of another socket type on this connection's ports: not for it.
      if (h.op !== VIRTIO_VSOCK_OP_RST) this.orphanReset(h);
    } else if (c !== undefined) c.onGuestPacket(h, chain);
    else if (h.op === VIRTIO_VSOCK_OP_REQUEST) this.#guestConnect(h);
    else if (h.op !== VIRTIO_VSOCK_OP_RST) this.orphanReset(h);
  }

  /**
   * A guest datagram: to a sibling VM, or to the host app bound at `<uds_path>_<port>.dgram`.
   * Connectionless: nothing answers a bad or undeliverable one (no RST), it is dropped.
   */
  #guestDatagram(h: PacketHeader, chain: DescChain): void {
    if (h.op !== VIRTIO_VSOCK_OP_RW) {
      this.#dgram!.dropped("toHost", `op ${opName(h.op)} on a datagram`);
    } else if (h.dstCid !== VSOCK_HOST_CID) {
      const to = this.options.hub?.route(this, h.dstCid);
      if (
        to === undefined || !to.acceptFromSibling(SiblingHub.packet(h, this.#payload(h, chain)))
      ) {
        this.#dgram!.dropped("toHost", `no room at CID ${h.dstCid}`);
      }
    } else {
      this.#dgram!.fromGuest(h, chain);
    }
  }

  #payload(h: PacketHeader, chain: DescChain): Uint8Array | null {
    if (h.len === 0) return null;
    const payload = new Uint8Array(h.len);
    chain.readInto(payload, VIRTIO_VSOCK_HDR_SIZE);
    return payload;
  }

  /** The guest connects to a host service: `<uds_path>_<port>`. */
  #guestConnect(h: PacketHeader): void {
    const port = h.dstPort;
    if (this.#conns.size >= this.options.maxConnections) {
      this.logFault(
        `vsock: connection limit (${this.options.maxConnections}) reached; RST to guest`,
      );
      this.orphanReset(h);
      return;
    }
    const path = `${this.options.udsPath}_${port}`;
    const seqpacket = h.type === VIRTIO_VSOCK_TYPE_SEQPACKET;
    let fd: number;
    try {
      // A seqpacket service listens with SOCK_SEQPACKET at the same path; a stream listener
      // there refuses it (EPROTOTYPE), and so does the guest's connect (RST).
      fd = connectUnix(path, { type: seqpacket ? SOCK_SEQPACKET : SOCK_STREAM });
    } catch (e) {
      const code = e instanceof SysError ? e.code : String(e);
      this.logEvent(`vsock: guest port ${h.srcPort} -> host port ${port}: ${path}: ${code}; RST`);
      this.orphanReset(h);
      return;
    }
    const c = new VsockConnection(
      this,
      port,
      h.srcPort,
      fd,
      ConnState.ESTABLISHED,
      this.#bufAlloc(h.type, fd),
      false,
      h.type,
    );
    c.weight = this.weightOf(c.peerPort);
    c.credit.updateFromPeer(h.bufAlloc, h.fwdCnt);
    this.#add(c);
    c.watchHost();
    c.pending |= Pending.RESPONSE;
    this.scheduleRx(c);
    this.logEvent(`vsock: connected ${c.describe()} (${path})`);
  }

  /** Owes the guest an RST answering `h` (a packet that matched no connection). */
  orphanReset(h: PacketHeader): void {
    this.scheduler.addOrphan({
      localPort: h.dstPort,
      peerPort: h.srcPort,
      srcCid: h.dstCidHi === 0 && h.dstCid !== this.options.guestCid ? h.dstCid : VSOCK_HOST_CID,
      type: h.type,
    });
    this.requestRx();
  }

  // --- host -> guest -------------------------------------------------------------------------

  /**
   * The buffer we advertise for a new connection. A seqpacket message must fit in it whole
   * (Linux refuses larger ones with EMSGSIZE), so seqpacket gets at least Linux's default;
   * the host socket's send buffer is raised to match, so such a message fits one record.
   */
  #bufAlloc(type: number, fd: number): number {
    if (type !== VIRTIO_VSOCK_TYPE_SEQPACKET) return this.options.txBufferSize;
    const size = Math.max(this.options.txBufferSize, DEFAULT_BUF_ALLOC);
    try {
      setSockOptInt(fd, SO_SNDBUF, 2 * size); // the kernel caps it at wmem_max
    } catch { /* keep the default */ }
    return size;
  }

  /** A host app completed `CONNECT <port>` (on the stream or the seqpacket socket). */
  #hostConnect(fd: number, port: number, early: Uint8Array | null, type: number): void {
    if (this.#conns.size >= this.options.maxConnections) {
      this.logFault(
        `vsock: connection limit (${this.options.maxConnections}) reached; host app refused`,
      );
      close(fd);
      return;
    }
    const localPort = this.#allocHostPort(port);
    const c = new VsockConnection(
      this,
      localPort,
      port,
      fd,
      ConnState.CONNECTING,
      this.#bufAlloc(type, fd),
      true,
      type,
    );
    c.weight = this.weightOf(port);
    c.fromHost = early;
    this.#add(c);
    c.offerToGuest(this.options.connectTimeoutMs);
    this.logEvent(`vsock: host app connecting to guest port ${port} (host port ${localPort})`);
  }

  #add(c: VsockConnection): void {
    this.#conns.add(c);
    this.#window?.add(c);
  }

  /** From now on, remember new connections: they may not survive the coming transport reset. */
  openConfirmWindow(): void {
    this.#window = new Set(this.#conns.all());
  }

  /** The reset is handled: ask the guest about each connection of the window (a CREDIT_REQUEST;
   * a dropped one answers RST, which closes the host socket). Returns how many were asked. */
  confirmWindow(): number {
    const window = this.#window;
    this.#window = null;
    if (window === null) return 0;
    let n = 0;
    for (const c of window) {
      if (c.closed) continue;
      c.pending |= Pending.CREDIT_REQUEST;
      this.scheduleRx(c);
      n++;
    }
    return n;
  }

  #allocHostPort(guestPort: number): number {
    for (;;) {
      const p = this.#nextHostPort;
      this.#nextHostPort = p + 1 >= HOST_PORT_END ? HOST_PORT_FIRST : p + 1;
      if (!this.#conns.has(p, guestPort)) return p;
    }
  }

  // --- rx buffers ----------------------------------------------------------------------------

  /** Something is owed to the guest. */
  hasRxWork(): boolean {
    return this.scheduler.orphanCount > 0 || this.scheduler.hasFlows;
  }

  /**
   * Writes the next packet owed to the guest into `chain`: an orphan RST first, else what
   * the RX scheduler picks. Returns its length or -1 (nothing could go into this buffer).
   */
  fillRx(chain: DescChain): number {
    const orphan = this.scheduler.nextOrphan();
    if (orphan === undefined) return this.scheduler.fill(chain);
    this.scheduler.servedSparse = false;
    const h = this.header;
    h.reset();
    h.srcCid = orphan.srcCid;
    h.dstCid = this.options.guestCid;
    h.srcPort = orphan.localPort;
    h.dstPort = orphan.peerPort;
    h.type = orphan.type;
    h.op = VIRTIO_VSOCK_OP_RST;
    this.emit(chain);
    return VIRTIO_VSOCK_HDR_SIZE;
  }

  // --- sibling VMs ---------------------------------------------------------------------------

  /** A guest packet for another CID: switch it to a sibling sharing a group, or RST. */
  #toSibling(h: PacketHeader, chain: DescChain): void {
    const to = this.options.hub?.route(this, h.dstCid);
    if (to === undefined) {
      if (log.debugOn) {
        log.debug(`vsock: packet for CID ${h.dstCid} (no sibling in our groups); RST`);
      }
      if (h.op !== VIRTIO_VSOCK_OP_RST) this.orphanReset(h);
      return;
    }
    if (!to.acceptFromSibling(SiblingHub.packet(h, this.#payload(h, chain)))) {
      this.logFault(`vsock: CID ${h.dstCid} is not taking packets (queue full); RST to the sender`);
      if (h.op !== VIRTIO_VSOCK_OP_RST) this.orphanReset(h);
    }
  }

  acceptFromSibling(p: SiblingPacket): boolean {
    return this.#inbox.accept(p);
  }

  // --- life cycle ----------------------------------------------------------------------------

  /** Closes every connection (no RST: the guest's side is gone too) and forgets what is owed. */
  reset(): number {
    const n = this.#conns.size;
    for (const c of [...this.#conns.all()]) c.destroy(false);
    this.#window = null;
    this.#dgram?.clear();
    this.scheduler.clear();
    this.#inbox.clear();
    return n;
  }

  /**
   * A device state was loaded: the guest's connections are gone after its transport reset,
   * so ours are closed on the host side too; host connects not yet offered to the guest
   * (REQUEST not sent) are kept. Returns how many were closed.
   */
  closeForLoad(): number {
    let closed = 0;
    for (const c of [...this.#conns.all()]) {
      if (c.state === ConnState.CONNECTING && (c.pending & Pending.REQUEST) !== 0) continue;
      c.destroy(false);
      closed++;
    }
    this.scheduler.clearOrphans();
    return closed;
  }

  /** Connections as a saved state lists them. */
  savedConnections(): { localPort: number; peerPort: number; hostInitiated: boolean }[] {
    return [...this.#conns.all()].map((c) => ({
      localPort: c.localPort,
      peerPort: c.peerPort,
      hostInitiated: c.hostInitiated,
    }));
  }

  /** Stops serving host apps and leaves the sibling switch. */
  dispose(): void {
    this.#host?.close();
    this.#seqpacketHost?.close();
    this.#dgram?.close();
    this.options.hub?.unregister(this);
  }
}
