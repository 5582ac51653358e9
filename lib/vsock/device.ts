/**
 * The virtio-vsock device (virtio 1.3 "Socket Device", device id 19) on top of
 * the vhost-user back end: it turns guest packets into host socket I/O and back.
 *
 * Queues: 0 rx (device -> driver), 1 tx (driver -> device), 2 event. Config
 * space: le64 guest_cid.
 *
 * TX (guest -> host), on every tx kick: pop chains, validate the 44-byte header
 * (src_cid must be the guest's, len must fit the chain, known op), route by op:
 * REQUEST to CID 2 port P connects to `<uds_path>_P` (RST if nothing listens),
 * RW payload goes to the host socket with one writev straight from guest memory
 * (what the socket cannot take is kept, bounded by the credit we advertised),
 * SHUTDOWN maps to shutdown(2), RST closes, CREDIT_* update credit. Packets for
 * no connection and unknown types get RST. TX keeps being processed while RX
 * is full, up to a bounded backlog of owed replies (then TX waits for RX).
 *
 * RX (host -> guest): connections owing packets sit in a round-robin queue; each
 * visit emits one packet into one guest buffer (data read with one readv from
 * the host socket straight into guest memory, bounded by the guest's credit), so
 * no flow starves another. When the guest has no buffers the device enables
 * notifications and re-checks the ring before sleeping (seed 001).
 *
 * Work that arrives while the rings are not active (suspend, before the driver
 * is up) is kept and processed when they become active (seed 000). Used-ring
 * updates and call notifications are batched per reactor batch.
 */
import {
  close,
  connectUnix,
  EAGAIN,
  EPOLLET,
  EPOLLIN,
  EPOLLOUT,
  EPOLLRDHUP,
  readvRaw,
  SHUT_WR,
  shutdownRaw,
  SysError,
  writeRaw,
  writevRaw,
} from "../../ffi/mod.ts";
import { log } from "../log.ts";
import type { Reactor } from "../reactor.ts";
import { DescChain } from "../virtio/desc_chain.ts";
import {
  VIRTIO_F_NOTIFY_ON_EMPTY_MASK,
  VIRTIO_F_VERSION_1_MASK,
  VIRTIO_RING_F_EVENT_IDX_MASK,
  VIRTIO_RING_F_INDIRECT_DESC_MASK,
} from "../virtio/features.ts";
import { POP_EMPTY, POP_INVALID, type SplitQueue } from "../virtio/split_queue.ts";
import type { GuestMemory } from "../virtio/memory.ts";
import type {
  ActiveQueue,
  QueueNotifier,
  ResetReason,
  VirtioDevice,
} from "../vhost_user/device.ts";
import { featureMask, VhostUserProtocolFeatureMask as PF } from "../vhost_user/protocol.ts";
import { formatOkLine } from "./connect_line.ts";
import { ConnState, Pending, VsockConnection } from "./connection.ts";
import {
  MAX_PKT_PAYLOAD,
  opName,
  VIRTIO_VSOCK_CONFIG_SIZE,
  VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
  VIRTIO_VSOCK_F_STREAM,
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
  VIRTIO_VSOCK_TYPE_STREAM,
  VSOCK_HOST_CID,
  VSOCK_VQ_EVENT,
  VSOCK_VQ_RX,
  VSOCK_VQ_TX,
} from "./constants.ts";
import { HostListener } from "./host_listener.ts";
import { HeaderError, PacketHeader, validateHeader } from "./packet.ts";
import { ConnectionTable } from "./connection_table.ts";
import { decodeSnapshot, encodeSnapshot } from "../snapshot/format.ts";
import {
  MAX_SIBLING_QUEUE_BYTES,
  MAX_SIBLING_QUEUE_PACKETS,
  type SiblingEndpoint,
  SiblingHub,
  type SiblingPacket,
} from "./sibling_hub.ts";

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
}

/** Chains handled per queue visit before yielding to other fds. */
const MAX_CHAINS_PER_VISIT = 1024;
/** Most iovecs one packet's payload may use. */
const MAX_IOV = 64;
/**
 * How long a connection the guest closed may keep draining queued bytes into a slow host
 * app; longer than Linux's VSOCK_CLOSE_TIMEOUT (8 s), after which the guest resets anyway.
 */
const CLOSE_DRAIN_TIMEOUT_MS = 10_000;
/** Most iovecs one gathered writev carries (the kernel's UIO_MAXIOV is 1024). */
const MAX_GATHER_IOV = 256;
/** Most payload bytes gathered into one writev. */
const MAX_GATHER_BYTES = 512 * 1024;
/** Standalone RSTs (for packets that match no connection) owed to the guest, at most. */
const MAX_PENDING_RESETS = 1024;

/** Counters for logs and tests. */
export interface DeviceStats {
  txPackets: number;
  rxPackets: number;
  txBytes: number;
  rxBytes: number;
  resets: number;
  badChains: number;
}

/** A reply owed for a packet that matched no connection. */
interface OrphanReset {
  localPort: number;
  peerPort: number;
  srcCid: number;
  type: number;
}

export class VsockDevice implements VirtioDevice, SiblingEndpoint {
  readonly name: string;
  readonly maxQueues = 3;
  readonly maxQueueSize: number;
  readonly features: bigint = VIRTIO_F_VERSION_1_MASK | VIRTIO_RING_F_EVENT_IDX_MASK |
    VIRTIO_RING_F_INDIRECT_DESC_MASK | VIRTIO_F_NOTIFY_ON_EMPTY_MASK |
    featureMask(VIRTIO_VSOCK_F_STREAM);
  readonly protocolFeatures: bigint = PF.CONFIG | PF.DEVICE_STATE;

  #reactor!: Reactor;
  readonly #conns = new ConnectionTable();
  #host: HostListener | null = null;
  #rx: ActiveQueue | null = null;
  #tx: ActiveQueue | null = null;
  #evt: ActiveQueue | null = null;
  readonly #rxChain: DescChain;
  readonly #txChain: DescChain;
  readonly #hdr = new PacketHeader();
  readonly #hdrBytes = new Uint8Array(VIRTIO_VSOCK_HDR_SIZE);
  readonly #hdrView = new DataView(this.#hdrBytes.buffer);
  readonly #iov = new BigUint64Array(2 * MAX_IOV);
  /**
   * RW payloads of consecutive TX packets for one connection, written with one writev at
   * the end of the run (their chains are published only after that write).
   */
  readonly #gatherIov = new BigUint64Array(2 * MAX_GATHER_IOV);
  readonly #gatherWords = new Uint32Array(this.#gatherIov.buffer);
  #gatherConn: VsockConnection | null = null;
  #gatherMem: GuestMemory | null = null;
  #gatherCount = 0;
  #gatherBytes = 0;
  /** round-robin RX scheduler: connections owing the guest a packet */
  #rxQueue: VsockConnection[] = [];
  #rxHead = 0;
  readonly #orphanResets: OrphanReset[] = [];
  /** packets from sibling VMs waiting for this guest's RX buffers */
  #siblingIn: SiblingPacket[] = [];
  #siblingHead = 0;
  #siblingBytes = 0;
  /** alternates RX turns between sibling packets and host connections */
  #siblingTurn = false;
  #rxNeedsRun = false;
  #txNeedsRun = false;
  #rxSignal = false;
  #txSignal = false;
  /** malformed packets seen (the first few are logged, then one in a thousand) */
  #badPackets = 0;
  /** TX stopped because too many replies are owed; RX draining resumes it */
  #txBlocked = false;
  #nextHostPort = 1 << 30;
  #ackedFeatures = 0n;
  /** a transport reset event is owed to the driver (after a state load) */
  transportResetPending = false;
  /** host/sibling traffic is held until the driver has (re)read the config */
  activated = true;
  /** the front end configured the event queue: we deliver TRANSPORT_RESET ourselves */
  eventQueueOwned = false;
  /** guest ports host apps reached (listeners the driver keeps across a transport reset) */
  readonly guestListenerPorts: Set<number> = new Set<number>();
  readonly stats: DeviceStats = {
    txPackets: 0,
    rxPackets: 0,
    txBytes: 0,
    rxBytes: 0,
    resets: 0,
    badChains: 0,
  };

  constructor(readonly options: VsockDeviceOptions) {
    this.name = `vsock(cid ${options.guestCid})`;
    this.maxQueueSize = options.queueSize;
    this.#rxChain = new DescChain(Math.max(options.queueSize, 1024) * 2);
    this.#txChain = new DescChain(Math.max(options.queueSize, 1024) * 2);
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

  attach(reactor: Reactor): void {
    this.#reactor = reactor;
    reactor.onBatchEnd(() => this.#onBatchEnd());
    this.#host = new HostListener(
      reactor,
      this.options.udsPath,
      (fd, port, early) => this.#hostConnect(fd, port, early),
      this.options.connectTimeoutMs,
      this.options.maxConnections,
    );
    this.#host.listen();
    this.options.hub?.register(this);
  }

  setFeatures(acked: bigint): void {
    this.#ackedFeatures = acked;
  }

  readConfig(offset: number, size: number): Uint8Array | null {
    if (offset < 0 || size < 0 || offset + size > VIRTIO_VSOCK_CONFIG_SIZE) return null;
    const cfg = new Uint8Array(VIRTIO_VSOCK_CONFIG_SIZE);
    new DataView(cfg.buffer).setUint32(0, this.options.guestCid, true);
    if (!this.activated) this.#configRead();
    return cfg.slice(offset, offset + size);
  }

  queueActive(q: ActiveQueue): void {
    if (q.index === VSOCK_VQ_RX) this.#rx = q;
    else if (q.index === VSOCK_VQ_TX) this.#tx = q;
    else if (q.index === VSOCK_VQ_EVENT) this.#evt = q;
  }

  queueInactive(index: number): void {
    if (index === VSOCK_VQ_RX) this.#flush(this.#rx), this.#rx = null;
    else if (index === VSOCK_VQ_TX) this.#flush(this.#tx), this.#tx = null;
    else if (index === VSOCK_VQ_EVENT) this.#flush(this.#evt), this.#evt = null;
  }

  queueConfigured(index: number): void {
    if (index === VSOCK_VQ_EVENT && !this.eventQueueOwned) {
      this.eventQueueOwned = true;
      log.debug("vsock: the front end hands us the event queue");
    }
  }

  queueKicked(index: number): void {
    if (index === VSOCK_VQ_TX) this.#processTx();
    else if (index === VSOCK_VQ_RX) this.#processRx();
    else if (index === VSOCK_VQ_EVENT) this.#sendTransportReset();
  }

  reset(reason: ResetReason): void {
    const n = this.#conns.size;
    for (const c of [...this.#conns.all()]) this.#destroy(c, false);
    this.#rxQueue = [];
    this.#rxHead = 0;
    this.#orphanResets.length = 0;
    this.#clearSiblingQueue();
    this.#rx = this.#tx = this.#evt = null;
    this.#ackedFeatures = 0n;
    this.transportResetPending = false;
    this.activated = true;
    if (reason !== "driver-reset") {
      this.eventQueueOwned = false;
      this.guestListenerPorts.clear();
    }
    if (n > 0) log.info(`vsock: device reset (${reason}): closed ${n} host connections`);
  }

  dispose(): void {
    this.reset("front-end-disconnected");
    this.#host?.close();
    this.options.hub?.unregister(this);
  }

  // --- scheduling ------------------------------------------------------------------------

  #scheduleRx(c: VsockConnection): void {
    if (!c.inRxQueue) {
      c.inRxQueue = true;
      this.#rxQueue.push(c);
    }
    this.#rxNeedsRun = true;
  }

  #onBatchEnd(): void {
    if (this.#txNeedsRun) this.#processTx();
    if (this.#rxNeedsRun) this.#processRx();
    this.#signal();
  }

  #signal(): void {
    if (this.#rxSignal && this.#rx !== null) {
      this.#rxSignal = false;
      this.#publish(this.#rx.queue, this.#rx.notifier);
    }
    if (this.#txSignal && this.#tx !== null) {
      this.#txSignal = false;
      this.#publish(this.#tx.queue, this.#tx.notifier);
    }
  }

  #publish(q: SplitQueue, n: QueueNotifier): void {
    q.publishUsed();
    if (q.needsNotification()) n.notify();
  }

  #flush(q: ActiveQueue | null): void {
    if (q === null) return;
    this.#publish(q.queue, q.notifier);
  }

  // --- TX: guest -> host -------------------------------------------------------------------

  #processTx(): void {
    this.#txNeedsRun = false;
    const tx = this.#tx;
    if (tx === null) return;
    const q = tx.queue;
    const chain = this.#txChain;
    let handled = 0;
    for (;;) {
      if (this.#orphanResets.length >= MAX_PENDING_RESETS) {
        // Back-pressure: the guest is not taking replies; resume when RX drains.
        this.#txBlocked = true;
        break;
      }
      if (handled >= MAX_CHAINS_PER_VISIT) {
        this.#txNeedsRun = true;
        this.#reactor.wake();
        break;
      }
      const r = q.popOrArm(chain); // empty: notifications armed and re-checked (seed 001)
      if (r === POP_EMPTY) break;
      handled++;
      if (r === POP_INVALID) {
        this.#badChain(q, chain.head, "tx", q.lastError);
        continue;
      }
      this.#txPacket(chain);
      q.pushUsed(chain.head, 0);
      this.#txSignal = true;
    }
    this.#flushGather();
    if (q.broken !== null) log.error(`vsock: tx queue broken: ${q.broken}`);
  }

  #badChain(q: SplitQueue, head: number, which: string, why: string): void {
    this.stats.badChains++;
    if (this.stats.badChains <= 10 || log.debugOn) {
      log.warn(`vsock: invalid ${which} descriptor chain (head ${head}): ${why}`);
    }
    q.pushUsed(head, 0);
    if (which === "tx") this.#txSignal = true;
    else this.#rxSignal = true;
  }

  #txPacket(chain: DescChain): void {
    const h = this.#hdr;
    if (chain.readableLen < VIRTIO_VSOCK_HDR_SIZE) {
      this.stats.badChains++;
      log.warn(`vsock: tx chain shorter than a header (${chain.readableLen} bytes); dropped`);
      return;
    }
    chain.readInto(this.#hdrBytes, 0);
    h.decodeFrom(this.#hdrView, 0);
    if (
      this.#gatherConn !== null &&
      (h.op !== VIRTIO_VSOCK_OP_RW || h.dstPort !== this.#gatherConn.localPort ||
        h.srcPort !== this.#gatherConn.peerPort)
    ) {
      this.#flushGather();
    }
    this.stats.txPackets++;
    if (log.traceOn) log.trace(`vsock: tx ${h.describe()}`);
    const bad = validateHeader(h, this.options.guestCid, chain.readableLen - VIRTIO_VSOCK_HDR_SIZE);
    if (bad !== null) {
      this.#badPackets++;
      if (this.#badPackets <= 10 || this.#badPackets % 1000 === 0 || log.debugOn) {
        log.warn(
          `vsock: bad packet from guest (${bad}; ${this.#badPackets} so far): ${h.describe()}`,
        );
      }
      // A packet that is not from this guest's CID is dropped, as Linux's vhost-vsock does:
      // an RST "from" its destination would end the guest's real connection on those ports.
      if (bad === HeaderError.SRC_CID || bad === HeaderError.SRC_CID_HIGH) return;
      if (h.op !== VIRTIO_VSOCK_OP_RST) this.#orphanReset(h);
      return;
    }
    if (h.type !== VIRTIO_VSOCK_TYPE_STREAM) {
      if (log.debugOn) log.debug(`vsock: unsupported socket type ${h.type}; RST`);
      if (h.op !== VIRTIO_VSOCK_OP_RST) this.#orphanReset(h);
      return;
    }
    if (h.dstCid !== VSOCK_HOST_CID) {
      this.#toSibling(h, chain);
      return;
    }
    const c = this.#conns.get(h.dstPort, h.srcPort);
    if (c === undefined) {
      if (h.op === VIRTIO_VSOCK_OP_REQUEST) this.#guestConnect(h);
      else if (h.op !== VIRTIO_VSOCK_OP_RST) this.#orphanReset(h);
      return;
    }
    const hadCredit = c.credit.peerFree() > 0;
    c.credit.updateFromPeer(h.bufAlloc, h.fwdCnt);
    switch (h.op) {
      case VIRTIO_VSOCK_OP_RW:
        this.#guestData(c, chain, h.len);
        break;
      case VIRTIO_VSOCK_OP_RESPONSE:
        this.#guestAccepted(c);
        break;
      case VIRTIO_VSOCK_OP_RST:
        this.#destroy(c, false);
        return;
      case VIRTIO_VSOCK_OP_SHUTDOWN:
        this.#guestShutdown(c, h.flags);
        break;
      case VIRTIO_VSOCK_OP_CREDIT_REQUEST:
        c.pending |= Pending.CREDIT_UPDATE;
        this.#scheduleRx(c);
        break;
      case VIRTIO_VSOCK_OP_CREDIT_UPDATE:
        break;
      case VIRTIO_VSOCK_OP_REQUEST:
        // A REQUEST for a connection that exists: the guest lost track of it.
        log.warn(`vsock: REQUEST for an existing connection (${c.describe()}); resetting it`);
        this.#resetConn(c);
        return;
    }
    if (c.state !== ConnState.CLOSED && !hadCredit && c.credit.peerFree() > 0 && c.hasRxWork()) {
      this.#scheduleRx(c);
    }
  }

  /** The guest connects to a host service: `<uds_path>_<port>`. */
  #guestConnect(h: PacketHeader): void {
    const port = h.dstPort;
    if (this.#conns.size >= this.options.maxConnections) {
      log.warn(`vsock: connection limit (${this.options.maxConnections}) reached; RST to guest`);
      this.#orphanReset(h);
      return;
    }
    const path = `${this.options.udsPath}_${port}`;
    let fd: number;
    try {
      fd = connectUnix(path);
    } catch (e) {
      const code = e instanceof SysError ? e.code : String(e);
      log.info(`vsock: guest port ${h.srcPort} -> host port ${port}: ${path}: ${code}; RST`);
      this.#orphanReset(h);
      return;
    }
    const c = new VsockConnection(
      port,
      h.srcPort,
      fd,
      ConnState.ESTABLISHED,
      this.options.txBufferSize,
      false,
    );
    c.credit.updateFromPeer(h.bufAlloc, h.fwdCnt);
    this.#conns.add(c);
    this.#watchHost(c);
    c.pending |= Pending.RESPONSE;
    this.#scheduleRx(c);
    log.info(`vsock: connected ${c.describe()} (${path})`);
  }

  #guestAccepted(c: VsockConnection): void {
    if (c.state !== ConnState.CONNECTING) {
      log.warn(`vsock: unexpected RESPONSE on ${c.describe()}; resetting`);
      this.#resetConn(c);
      return;
    }
    c.timer?.cancel();
    c.timer = null;
    c.state = ConnState.ESTABLISHED;
    const ok = new TextEncoder().encode(formatOkLine(c.localPort));
    const n = writeRaw(c.hostFd, ok);
    if (n !== ok.length) {
      log.info(`vsock: host app of ${c.describe()} went away before OK; resetting`);
      this.#resetConn(c);
      return;
    }
    this.#watchHost(c);
    this.guestListenerPorts.add(c.peerPort);
    log.info(`vsock: established ${c.describe()}`);
    if (c.hasRxWork()) this.#scheduleRx(c);
  }

  #guestData(c: VsockConnection, chain: DescChain, len: number): void {
    if (len === 0) return;
    if (
      c.state !== ConnState.ESTABLISHED || (c.guestShutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND) !== 0
    ) {
      log.warn(`vsock: data on ${c.describe()} in the wrong state; resetting`);
      this.#resetConn(c);
      return;
    }
    if (!c.credit.onReceived(len)) {
      log.warn(`vsock: guest exceeded our credit on ${c.describe()}; resetting`);
      this.#resetConn(c);
      return;
    }
    this.stats.txBytes += len;
    let written = 0;
    if (c.toHost.length === 0 && !c.hostWriteShut) {
      if (
        this.#gatherConn !== null &&
        (this.#gatherConn !== c || this.#gatherCount + chain.readableCount > MAX_GATHER_IOV ||
          this.#gatherBytes + len > MAX_GATHER_BYTES)
      ) {
        this.#flushGather();
      }
      if (this.#gatherCount + chain.readableCount <= MAX_GATHER_IOV) {
        const n = chain.hostIovecs(
          chain.mem!,
          this.#gatherIov,
          VIRTIO_VSOCK_HDR_SIZE,
          len,
          false,
          this.#gatherCount,
        );
        if (chain.iovBytes === len) {
          this.#gatherConn = c;
          this.#gatherMem = chain.mem;
          this.#gatherCount += n;
          this.#gatherBytes += len;
          return;
        }
      }
      this.#flushGather();
      const iovs = chain.hostIovecs(chain.mem!, this.#iov, VIRTIO_VSOCK_HDR_SIZE, len, false);
      const n = writevRaw(c.hostFd, this.#iov, iovs);
      if (n >= 0) written = n;
      else if (n !== -EAGAIN) {
        log.info(`vsock: host app of ${c.describe()} closed (errno ${-n}); resetting`);
        this.#resetConn(c);
        return;
      }
      if (written > 0) this.#forwarded(c, written);
    }
    if (written < len) {
      const rest = len - written;
      const dst = c.toHost.reserve(rest);
      if (dst === null) {
        log.warn(`vsock: guest->host buffer overflow on ${c.describe()}; resetting`);
        this.#resetConn(c);
        return;
      }
      chain.readInto(dst, VIRTIO_VSOCK_HDR_SIZE + written);
      c.toHost.commit(rest);
    }
  }

  /**
   * Writes the gathered payloads with one writev; what the socket does not take goes to
   * the connection's backlog (copied from guest memory before the chains are published).
   */
  #flushGather(): void {
    const c = this.#gatherConn;
    if (c === null) return;
    const count = this.#gatherCount;
    const bytes = this.#gatherBytes;
    const mem = this.#gatherMem!;
    this.#gatherConn = null;
    this.#gatherMem = null;
    this.#gatherCount = 0;
    this.#gatherBytes = 0;
    if (c.state === ConnState.CLOSED) return;
    const n = writevRaw(c.hostFd, this.#gatherIov, count);
    if (n < 0 && n !== -EAGAIN) {
      log.info(`vsock: host app of ${c.describe()} closed (errno ${-n}); resetting`);
      this.#resetConn(c);
      return;
    }
    const written = n > 0 ? n : 0;
    if (written > 0) this.#forwarded(c, written);
    if (written < bytes) {
      const dst = c.toHost.reserve(bytes - written);
      if (dst === null) {
        log.warn(`vsock: guest->host buffer overflow on ${c.describe()}; resetting`);
        this.#resetConn(c);
        return;
      }
      this.#copyFromGather(mem, count, written, dst);
      c.toHost.commit(bytes - written);
    }
  }

  /** Copies the gathered iovecs' bytes, from `skip` on, into `dst`. */
  #copyFromGather(mem: GuestMemory, count: number, skip: number, dst: Uint8Array): void {
    const w = this.#gatherWords;
    let off = 0;
    for (let i = 0; i < count && off < dst.length; i++) {
      const base = w[4 * i] + w[4 * i + 1] * 0x1_0000_0000;
      const len = w[4 * i + 2];
      if (skip >= len) {
        skip -= len;
        continue;
      }
      const r = mem.regions.find((r) => base >= r.hostAddr && base < r.hostAddr + r.size)!;
      const from = base - r.hostAddr + skip;
      const n = Math.min(len - skip, dst.length - off);
      dst.set(r.bytes.subarray(from, from + n), off);
      off += n;
      skip = 0;
    }
  }

  /** `n` bytes reached the host app: credit goes back to the guest. */
  #forwarded(c: VsockConnection, n: number): void {
    c.credit.onForwarded(n);
    if (!c.closeWhenFlushed && c.credit.needsCreditUpdate()) {
      c.pending |= Pending.CREDIT_UPDATE;
      this.#scheduleRx(c);
    }
  }

  /** The host socket is writable again: drain what the guest sent meanwhile. */
  #flushToHost(c: VsockConnection): void {
    while (c.toHost.length > 0) {
      const data = c.toHost.peek();
      const n = writeRaw(c.hostFd, data, data.length);
      if (n === -EAGAIN) return;
      if (n < 0) {
        log.info(`vsock: host app of ${c.describe()} closed (errno ${-n}); resetting`);
        this.#resetConn(c);
        return;
      }
      c.toHost.consume(n);
      this.#forwarded(c, n);
    }
    if (c.closeWhenFlushed) {
      this.#resetConn(c);
      return;
    }
    this.#maybeShutHostWrite(c);
  }

  #guestShutdown(c: VsockConnection, flags: number): void {
    c.guestShutdown |= flags & VIRTIO_VSOCK_SHUTDOWN_F_BOTH;
    if (log.debugOn) log.debug(`vsock: guest shutdown flags ${flags} on ${c.describe()}`);
    if ((c.guestShutdown & VIRTIO_VSOCK_SHUTDOWN_F_BOTH) === VIRTIO_VSOCK_SHUTDOWN_F_BOTH) {
      // The guest is closing: hand over everything it sent, then close and confirm with
      // RST. If the host app is slow, wait for the socket to drain (the guest waits for our
      // RST up to its close timeout, 8 s on Linux, then resets the connection itself).
      this.#flushToHost(c);
      if (c.state === ConnState.CLOSED) return;
      if (c.toHost.length === 0) {
        this.#resetConn(c);
      } else if (!c.closeWhenFlushed) {
        c.closeWhenFlushed = true;
        c.timer?.cancel();
        c.timer = this.#reactor.setTimer(CLOSE_DRAIN_TIMEOUT_MS, () => {
          c.timer = null;
          log.warn(
            `vsock: host app of ${c.describe()} did not take ${c.toHost.length} bytes within ` +
              `${CLOSE_DRAIN_TIMEOUT_MS} ms of the guest closing; resetting`,
          );
          this.#resetConn(c);
        });
      }
      return;
    }
    this.#maybeShutHostWrite(c);
    this.#maybeFinish(c);
  }

  #maybeShutHostWrite(c: VsockConnection): void {
    if (
      !c.hostWriteShut && c.toHost.length === 0 &&
      (c.guestShutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND) !== 0
    ) {
      c.hostWriteShut = true;
      shutdownRaw(c.hostFd, SHUT_WR);
      this.#maybeFinish(c);
    }
  }

  /** Both directions are done: close the host socket and tell the guest with RST. */
  #maybeFinish(c: VsockConnection): void {
    if (
      c.state === ConnState.ESTABLISHED && c.hostEof && c.hostWriteShut &&
      (c.pending & Pending.SHUTDOWN) === 0
    ) {
      if (log.debugOn) log.debug(`vsock: both directions closed on ${c.describe()}`);
      this.#resetConn(c);
    }
  }

  // --- host side -----------------------------------------------------------------------------

  #watchHost(c: VsockConnection): void {
    const fd = c.hostFd;
    const closed = () => c.state === ConnState.CLOSED;
    this.#reactor.addFd(fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, (ev) => {
      if (closed()) return;
      if ((ev & EPOLLOUT) !== 0 && c.toHost.length > 0) this.#flushToHost(c);
      if (closed()) return;
      if ((ev & ~EPOLLOUT) !== 0) {
        c.hostReadable = true;
        if (c.hasRxWork()) this.#scheduleRx(c);
      }
    });
  }

  /** A host app completed `CONNECT <port>`: ask the guest. */
  #hostConnect(fd: number, port: number, early: Uint8Array | null): void {
    if (this.#conns.size >= this.options.maxConnections) {
      log.warn(
        `vsock: connection limit (${this.options.maxConnections}) reached; host app refused`,
      );
      close(fd);
      return;
    }
    const localPort = this.#allocHostPort(port);
    const c = new VsockConnection(
      localPort,
      port,
      fd,
      ConnState.CONNECTING,
      this.options.txBufferSize,
      true,
    );
    c.fromHost = early;
    this.#conns.add(c);
    c.pending |= Pending.REQUEST;
    c.timer = this.#reactor.setTimer(this.options.connectTimeoutMs, () => {
      c.timer = null;
      log.info(
        `vsock: guest did not accept ${c.describe()} within ${this.options.connectTimeoutMs} ms`,
      );
      this.#resetConn(c);
    });
    this.#scheduleRx(c);
    log.info(`vsock: host app connecting to guest port ${port} (host port ${localPort})`);
  }

  #allocHostPort(guestPort: number): number {
    for (;;) {
      const p = this.#nextHostPort;
      this.#nextHostPort = p + 1 >= 2 ** 31 ? 1 << 30 : p + 1;
      if (!this.#conns.has(p, guestPort)) return p;
    }
  }

  // --- RX: host -> guest ---------------------------------------------------------------------

  #processRx(): void {
    this.#rxNeedsRun = false;
    const rx = this.#rx;
    if (rx === null) return;
    if (!this.activated) return;
    const q = rx.queue;
    const chain = this.#rxChain;
    let produced = 0;
    while (
      this.#orphanResets.length > 0 || this.#rxHead < this.#rxQueue.length ||
      this.#siblingHead < this.#siblingIn.length
    ) {
      if (produced >= MAX_CHAINS_PER_VISIT) {
        this.#rxNeedsRun = true;
        this.#reactor.wake();
        break;
      }
      const r = q.popOrArm(chain); // empty: notifications armed and re-checked (seed 001)
      if (r === POP_EMPTY) break;
      if (r === POP_INVALID) {
        this.#badChain(q, chain.head, "rx", q.lastError);
        continue;
      }
      if (chain.writableLen < VIRTIO_VSOCK_HDR_SIZE || chain.readableCount !== 0) {
        this.#badChain(q, chain.head, "rx", `buffer of ${chain.writableLen} writable bytes`);
        continue;
      }
      const len = this.#fillRx(chain);
      if (len < 0) {
        // Nobody could use this buffer after all (no data on the socket yet): give it
        // back to the avail ring; connections still owing packets stay queued.
        q.unpop();
        break;
      }
      q.pushUsed(chain.head, len);
      this.#rxSignal = true;
      produced++;
    }
    if (this.#rxHead >= this.#rxQueue.length) {
      this.#rxQueue.length = 0;
      this.#rxHead = 0;
    } else if (this.#rxHead > 1024) {
      this.#rxQueue = this.#rxQueue.slice(this.#rxHead);
      this.#rxHead = 0;
    }
    // Replies drained: a TX backlog may proceed (on the next batch).
    if (this.#txBlocked && this.#orphanResets.length < MAX_PENDING_RESETS) {
      this.#txBlocked = false;
      this.#txNeedsRun = true;
      this.#reactor.wake();
    }
  }

  /** Writes the next packet owed to the guest into `chain`; returns its length or -1. */
  #fillRx(chain: DescChain): number {
    const orphan = this.#orphanResets.pop();
    if (orphan !== undefined) {
      this.#writeHeader(
        chain,
        orphan.localPort,
        orphan.peerPort,
        VIRTIO_VSOCK_OP_RST,
        0,
        0,
        null,
        orphan.srcCid,
        orphan.type,
      );
      return VIRTIO_VSOCK_HDR_SIZE;
    }
    const siblings = this.#siblingHead < this.#siblingIn.length;
    if (siblings && (this.#siblingTurn || this.#rxHead >= this.#rxQueue.length)) {
      this.#siblingTurn = false;
      return this.#fillFromSibling(chain);
    }
    this.#siblingTurn = siblings;
    while (this.#rxHead < this.#rxQueue.length) {
      const c = this.#rxQueue[this.#rxHead++];
      c.inRxQueue = false;
      if (c.state === ConnState.CLOSED && (c.pending & Pending.RST) === 0) continue;
      const len = this.#fillFromConn(c, chain);
      if (c.state !== ConnState.CLOSED || (c.pending & Pending.RST) !== 0) {
        if (c.hasRxWork()) this.#scheduleRx(c);
      }
      if (len >= 0) return len;
    }
    return siblings ? this.#fillFromSibling(chain) : -1;
  }

  #fillFromConn(c: VsockConnection, chain: DescChain): number {
    const p = c.pending;
    if (p & Pending.RST) {
      c.pending = 0;
      this.#writeHeader(chain, c.localPort, c.peerPort, VIRTIO_VSOCK_OP_RST, 0, 0, null);
      return VIRTIO_VSOCK_HDR_SIZE;
    }
    if (p & Pending.REQUEST) {
      c.pending &= ~Pending.REQUEST;
      this.#writeHeader(chain, c.localPort, c.peerPort, VIRTIO_VSOCK_OP_REQUEST, 0, 0, c);
      return VIRTIO_VSOCK_HDR_SIZE;
    }
    if (p & Pending.RESPONSE) {
      c.pending &= ~Pending.RESPONSE;
      this.#writeHeader(chain, c.localPort, c.peerPort, VIRTIO_VSOCK_OP_RESPONSE, 0, 0, c);
      return VIRTIO_VSOCK_HDR_SIZE;
    }
    // Data before SHUTDOWN: the SHUTDOWN(SEND) for host EOF goes after the bytes read.
    const data = this.#fillData(c, chain);
    if (data >= 0) return data;
    if (c.state === ConnState.CLOSED) return -1;
    if (c.pending & Pending.SHUTDOWN) {
      c.pending &= ~Pending.SHUTDOWN;
      this.#writeHeader(
        chain,
        c.localPort,
        c.peerPort,
        VIRTIO_VSOCK_OP_SHUTDOWN,
        c.shutdownFlagsToSend,
        0,
        c,
      );
      this.#maybeFinish(c);
      return VIRTIO_VSOCK_HDR_SIZE;
    }
    if (c.pending & Pending.CREDIT_UPDATE) {
      c.pending &= ~Pending.CREDIT_UPDATE;
      this.#writeHeader(chain, c.localPort, c.peerPort, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, 0, c);
      return VIRTIO_VSOCK_HDR_SIZE;
    }
    return -1;
  }

  /** One RW packet from early bytes or the host socket; -1 if there is none to send. */
  #fillData(c: VsockConnection, chain: DescChain): number {
    if (c.state !== ConnState.ESTABLISHED) return -1;
    if ((c.guestShutdown & VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE) !== 0) return -1;
    const credit = c.credit.peerFree();
    if (credit <= 0) return -1;
    const max = Math.min(chain.writableLen - VIRTIO_VSOCK_HDR_SIZE, credit, MAX_PKT_PAYLOAD);
    if (max <= 0) return -1;
    let n: number;
    if (c.fromHost !== null) {
      const early = c.fromHost;
      n = Math.min(max, early.length);
      chain.writeFrom(early.subarray(0, n), VIRTIO_VSOCK_HDR_SIZE);
      c.fromHost = n < early.length ? early.subarray(n) : null;
    } else {
      if (!c.hostReadable || c.hostEof) return -1;
      const iovs = chain.hostIovecs(chain.mem!, this.#iov, VIRTIO_VSOCK_HDR_SIZE, max, true);
      n = readvRaw(c.hostFd, this.#iov, iovs);
      if (n === -EAGAIN) {
        c.hostReadable = false;
        return -1;
      }
      if (n === 0) {
        // Host EOF: half-close toward the guest (SHUTDOWN with SEND only).
        c.hostReadable = false;
        c.hostEof = true;
        c.shutdownFlagsToSend = VIRTIO_VSOCK_SHUTDOWN_F_SEND;
        c.pending |= Pending.SHUTDOWN;
        if (log.debugOn) log.debug(`vsock: host EOF on ${c.describe()}`);
        return -1;
      }
      if (n < 0) {
        log.info(`vsock: host socket error on ${c.describe()} (errno ${-n}); resetting`);
        this.#resetConn(c);
        return -1;
      }
      chain.markWritten(VIRTIO_VSOCK_HDR_SIZE, n);
    }
    c.credit.consumeTx(n);
    this.stats.rxBytes += n;
    this.#writeHeader(chain, c.localPort, c.peerPort, VIRTIO_VSOCK_OP_RW, 0, n, c);
    return VIRTIO_VSOCK_HDR_SIZE + n;
  }

  #writeHeader(
    chain: DescChain,
    localPort: number,
    peerPort: number,
    op: number,
    flags: number,
    len: number,
    c: VsockConnection | null,
    srcCid = VSOCK_HOST_CID,
    type: number = VIRTIO_VSOCK_TYPE_STREAM,
  ): void {
    const h = this.#hdr;
    h.reset();
    h.srcCid = srcCid;
    h.dstCid = this.options.guestCid;
    h.srcPort = localPort;
    h.dstPort = peerPort;
    h.len = len;
    h.type = type;
    h.op = op;
    h.flags = flags;
    if (c !== null) {
      c.credit.stamp(h);
      c.pending &= ~Pending.CREDIT_UPDATE;
    }
    h.encodeTo(this.#hdrView, 0);
    chain.writeFrom(this.#hdrBytes, 0);
    this.stats.rxPackets++;
    if (log.traceOn) log.trace(`vsock: rx ${h.describe()} op=${opName(op)}`);
  }

  // --- teardown --------------------------------------------------------------------------------

  /** Ends `c`: closes the host socket and owes the guest an RST. */
  #resetConn(c: VsockConnection): void {
    if (c.state === ConnState.CLOSED) return;
    this.#destroy(c, true);
  }

  #destroy(c: VsockConnection, sendRst: boolean): void {
    if (c.state !== ConnState.CLOSED) {
      c.state = ConnState.CLOSED;
      c.timer?.cancel();
      c.timer = null;
      this.#reactor.removeFd(c.hostFd);
      close(c.hostFd);
      c.hostFd = -1;
      c.toHost.clear();
      c.fromHost = null;
      this.#conns.delete(c);
      this.stats.resets++;
      if (log.debugOn) log.debug(`vsock: closed ${c.describe()}`);
    }
    if (sendRst) {
      c.pending = Pending.RST;
      this.#scheduleRx(c);
    } else {
      c.pending = 0;
    }
  }

  #orphanReset(h: PacketHeader): void {
    if (this.#orphanResets.length >= MAX_PENDING_RESETS) return;
    this.#orphanResets.push({
      localPort: h.dstPort,
      peerPort: h.srcPort,
      srcCid: h.dstCidHi === 0 && h.dstCid !== this.options.guestCid ? h.dstCid : VSOCK_HOST_CID,
      type: h.type,
    });
    this.#rxNeedsRun = true;
  }

  // --- sibling VMs ---------------------------------------------------------------------------

  /** A guest packet for another CID: switch it to a sibling sharing a group, or RST. */
  #toSibling(h: PacketHeader, chain: DescChain): void {
    const to = this.options.hub?.route(this, h.dstCid);
    if (to === undefined) {
      if (log.debugOn) {
        log.debug(`vsock: packet for CID ${h.dstCid} (no sibling in our groups); RST`);
      }
      if (h.op !== VIRTIO_VSOCK_OP_RST) this.#orphanReset(h);
      return;
    }
    let payload: Uint8Array | null = null;
    if (h.len > 0) {
      payload = new Uint8Array(h.len);
      chain.readInto(payload, VIRTIO_VSOCK_HDR_SIZE);
    }
    if (!to.acceptFromSibling(SiblingHub.packet(h, payload))) {
      log.warn(`vsock: CID ${h.dstCid} is not taking packets (queue full); RST to the sender`);
      if (h.op !== VIRTIO_VSOCK_OP_RST) this.#orphanReset(h);
    }
  }

  acceptFromSibling(p: SiblingPacket): boolean {
    const size = VIRTIO_VSOCK_HDR_SIZE + (p.payload?.length ?? 0);
    const queued = this.#siblingIn.length - this.#siblingHead;
    if (
      queued >= MAX_SIBLING_QUEUE_PACKETS || this.#siblingBytes + size > MAX_SIBLING_QUEUE_BYTES
    ) {
      return false;
    }
    this.#siblingIn.push(p);
    this.#siblingBytes += size;
    this.#rxNeedsRun = true;
    return true;
  }

  /** Delivers (part of) the next sibling packet; an RW larger than the buffer is split. */
  #fillFromSibling(chain: DescChain): number {
    const p = this.#siblingIn[this.#siblingHead];
    const total = p.payload?.length ?? 0;
    const n = Math.min(total - p.offset, chain.writableLen - VIRTIO_VSOCK_HDR_SIZE);
    if (total > 0 && n <= 0) return -1;
    if (n > 0) chain.writeFrom(p.payload!.subarray(p.offset, p.offset + n), VIRTIO_VSOCK_HDR_SIZE);
    const h = this.#hdr;
    h.reset();
    h.srcCid = p.srcCid;
    h.dstCid = this.options.guestCid;
    h.srcPort = p.srcPort;
    h.dstPort = p.dstPort;
    h.len = n;
    h.type = p.type;
    h.op = p.op;
    h.flags = p.flags;
    h.bufAlloc = p.bufAlloc;
    h.fwdCnt = p.fwdCnt;
    h.encodeTo(this.#hdrView, 0);
    chain.writeFrom(this.#hdrBytes, 0);
    this.stats.rxPackets++;
    p.offset += n;
    if (p.offset >= total) {
      this.#siblingBytes -= VIRTIO_VSOCK_HDR_SIZE + total;
      this.#siblingIn[this.#siblingHead++] = undefined as unknown as SiblingPacket;
      if (this.#siblingHead === this.#siblingIn.length) this.#clearSiblingQueue();
    }
    return VIRTIO_VSOCK_HDR_SIZE + n;
  }

  #clearSiblingQueue(): void {
    this.#siblingIn = [];
    this.#siblingHead = 0;
    this.#siblingBytes = 0;
  }

  // --- event queue / activation (snapshot restore) ---------------------------------------------

  /**
   * The driver read the config space while host traffic is held after a load.
   * When we own the event queue, a read before the TRANSPORT_RESET event was
   * delivered is the driver's stale pre-snapshot read (the race rust-vmm's PR
   * admitted): it does not count. The read that follows the event is the
   * driver re-reading its CID after dropping its connections: traffic may flow.
   * When the front end keeps the event queue (QEMU), the first read counts.
   */
  #configRead(): void {
    if (this.eventQueueOwned && this.transportResetPending) {
      log.info("vsock: config read before the transport reset was delivered; traffic still held");
      return;
    }
    this.activated = true;
    log.info("vsock: the driver re-read the config after the restore; host traffic flows");
    this.#rxNeedsRun = true;
  }

  saveState(): Uint8Array {
    const conns = [...this.#conns.all()].map((c) => ({
      localPort: c.localPort,
      peerPort: c.peerPort,
      hostInitiated: c.hostInitiated,
    }));
    return encodeSnapshot({
      guestCid: this.options.guestCid,
      features: this.#ackedFeatures.toString(16),
      guestListenerPorts: [...this.guestListenerPorts],
      connections: conns,
      transportResetPending: this.transportResetPending,
      activated: this.activated,
      eventQueueOwned: this.eventQueueOwned,
      savedAt: new Date().toISOString(),
    });
  }

  /**
   * Loads a saved state (rings stopped). Connections do not survive: the driver
   * drops its own on TRANSPORT_RESET, so ours are reset on the host side too.
   * Host traffic is held until the driver has re-read the config.
   */
  loadState(bytes: Uint8Array): void {
    const s = decodeSnapshot(bytes);
    // Connections the guest knew are gone after its reset; host connects still waiting to be
    // offered to the guest (REQUEST not sent yet) are held, not dropped.
    let open = 0;
    for (const c of [...this.#conns.all()]) {
      if (c.state === ConnState.CONNECTING && (c.pending & Pending.REQUEST) !== 0) continue;
      this.#destroy(c, false);
      open++;
    }
    this.#orphanResets.length = 0;
    if (s.guestCid !== this.options.guestCid) {
      log.info(
        `vsock: restored state was CID ${s.guestCid}; this device is CID ${this.options.guestCid}`,
      );
    }
    for (const p of s.guestListenerPorts) this.guestListenerPorts.add(p);
    this.transportResetPending = true;
    // A VMM that keeps the event queue (QEMU) sends TRANSPORT_RESET itself and answers the
    // driver's config reads from its own cache: nothing the driver does is visible here, so
    // holding traffic would hold it forever. Hold only when the event queue is ours.
    this.activated = s.eventQueueOwned === false;
    log.info(
      `vsock: state loaded (saved ${s.savedAt}, ${s.connections.length} connections then, ` +
        `${open} host connections closed now); TRANSPORT_RESET owed, host traffic ` +
        (this.activated
          ? "flows (the VMM keeps the event queue)"
          : "held until the config is re-read"),
    );
  }

  /** Sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET if one is owed and the event queue is ours. */
  #sendTransportReset(): void {
    const evt = this.#evt;
    if (!this.transportResetPending || evt === null) return;
    const q = evt.queue;
    const chain = this.#rxChain;
    const r = q.pop(chain);
    if (r === POP_EMPTY) {
      q.enableNotification();
      return;
    }
    if (r === POP_INVALID || chain.writableLen < 4) {
      this.#badChain(q, chain.head, "event", q.lastError || "event buffer too small");
      this.#publish(q, evt.notifier);
      return;
    }
    const ev = new Uint8Array(4);
    new DataView(ev.buffer).setUint32(0, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, true);
    chain.writeFrom(ev, 0);
    q.pushUsed(chain.head, 4);
    this.#publish(q, evt.notifier);
    this.transportResetPending = false;
    log.info(
      "vsock: TRANSPORT_RESET event sent to the driver; waiting for it to re-read the config",
    );
  }
}
