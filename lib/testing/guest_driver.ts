/**
 * A virtio-vsock guest driver for tests, behaving like Linux's
 * `net/vmw_vsock/virtio_transport.c` (the virtqueue side) and
 * `virtio_transport_common.c` (the protocol side, see guest_conn.ts), on top of a
 * `VhostUserFrontEnd` that plays the VMM.
 *
 * Probe (like `virtio_vsock_probe`): negotiate features (the offered subset Linux knows:
 * VERSION_1, EVENT_IDX, INDIRECT_DESC), read `guest_cid` from the config space, lay out the
 * three split rings (rx 0, tx 1, event 2) in guest RAM, DRIVER_OK (the front end's
 * `startDevice`), then fill the rx queue (one device-writable descriptor of 44 + 4096 bytes per
 * buffer, until the ring is full) and the event queue (8 buffers of 4 bytes), kicking each.
 *
 * Data path:
 * - tx: each packet is a header descriptor plus payload descriptor(s) in one chain, through an
 *   indirect table when INDIRECT_DESC is negotiated and the chain has more than one
 *   descriptor, as `virtqueue_add_sgs` does. Payload is copied into preallocated tx buffers
 *   (`txSlots` of them); buffers come back when the device puts the chain on the used ring.
 * - rx: used buffers are parsed (used len must cover the header and `hdr.len`), dispatched by
 *   op, and re-posted in batches: like Linux, the ring is refilled once fewer than half of the
 *   buffers are posted.
 * - notifications: kicks follow `virtqueue_kick_prepare` (VRING_USED_F_NO_NOTIFY, or
 *   avail_event with EVENT_IDX); used rings are drained with callbacks disabled and then
 *   re-enabled with a re-check (`virtqueue_enable_cb`), so no interrupt is needed for work that
 *   raced the re-enable.
 * - events: TRANSPORT_RESET drops every connection (no packets), keeps listeners and
 *   re-reads guest_cid.
 *
 * Waiting: every socket call that waits goes through `waitFor(predicate, timeoutMs)`, which
 * pumps the rings and then awaits `pollFdsAsync` on the call eventfds (plus the vhost-user
 * socket, to notice a dead back end) in slices of at most 100 ms, so Deno's event loop keeps
 * running host-side sockets in the same test. One poll is outstanding at a time however many
 * callers wait. Each wait ends with a `GuestTimeoutError` that describes the rings and
 * connections. Call `close()` (or `VmHandle.stop()`) before a test ends so no poll is pending.
 *
 * Anything the back end does that a Linux guest would drop or that breaks the spec (a bad
 * used length, a packet to another CID, data beyond credit, an unknown event) is recorded in
 * `anomalies`; tests should assert it stays empty.
 */

import {
  close as closeFd,
  eventFd,
  eventFdRead,
  eventFdWrite,
  POLLERR,
  pollFdsAsync,
  POLLHUP,
  POLLIN,
} from "../../ffi/mod.ts";
import {
  featureMask,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../virtio/features.ts";
import {
  compactRingLayout,
  descTableSize,
  VRING_DESC_NEXT,
  VRING_DESC_SIZE,
} from "../virtio/split_layout.ts";
import {
  VIRTIO_VSOCK_EVENT_SIZE,
  VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_OP_CREDIT_REQUEST,
  VIRTIO_VSOCK_OP_CREDIT_UPDATE,
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RESPONSE,
  VIRTIO_VSOCK_OP_RST,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_OP_SHUTDOWN,
  VIRTIO_VSOCK_TYPE_STREAM,
  VSOCK_HOST_CID,
  VSOCK_VQ_COUNT,
  VSOCK_VQ_EVENT,
  VSOCK_VQ_RX,
  VSOCK_VQ_TX,
} from "../vsock/constants.ts";
import { PacketHeader } from "../vsock/packet.ts";
import { DriverSplitQueue } from "./driver_queue.ts";
import type { QueueSetup, VhostUserFrontEnd } from "./front_end.ts";
import type { GuestRam } from "./guest_ram.ts";
import {
  type ConnDriver,
  type GuestCloseReason,
  GuestConn,
  GuestConnError,
  type WaitOptions,
} from "./guest_conn.ts";

export { GuestConn, GuestConnError };
export type { GuestCloseReason, WaitOptions };
export type { GuestConnState } from "./guest_conn.ts";

/** Linux's VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE. */
export const LINUX_RX_BUF_SIZE = 4096;
/** Linux's `event_list` size. */
export const LINUX_EVENT_BUFFERS = 8;
/** Linux's default SO_VM_SOCKETS_BUFFER_SIZE (the buf_alloc it advertises). */
export const LINUX_BUF_ALLOC = 256 * 1024;
/** Linux's VSOCK_DEFAULT_CONNECT_TIMEOUT (2 s). */
export const LINUX_CONNECT_TIMEOUT_MS = 2000;
/** Linux's VSOCK_CLOSE_TIMEOUT (8 s). */
export const LINUX_CLOSE_TIMEOUT_MS = 8000;
/** Transport features the Linux virtio core keeps that this driver implements. */
export const LINUX_DRIVER_FEATURES: bigint = featureMask(VIRTIO_F_VERSION_1) |
  featureMask(VIRTIO_RING_F_EVENT_IDX) | featureMask(VIRTIO_RING_F_INDIRECT_DESC);
/** Longest slice of one poll while waiting (bounds deadline overshoot). */
const POLL_SLICE_MS = 100;
const POLLNVAL = 0x20;

/** A wait ran out of time. The message says what was awaited and the state of the rings. */
export class GuestTimeoutError extends Error {
  override name = "GuestTimeoutError";
}

/** A connect() that failed: refused (RST), timed out, or broken by a reset. */
export class GuestConnectError extends Error {
  override name = "GuestConnectError";
  constructor(message: string, readonly reason: GuestCloseReason | null) {
    super(message);
  }
}

/** Options of `VsockGuest.boot`. */
export interface VsockGuestOptions {
  /** payload bytes per rx buffer (default 4096, Linux's; 65536 for big buffers) */
  readonly rxBufSize?: number;
  /** rx buffers to allocate (default: the queue size, so the ring is filled) */
  readonly rxBuffers?: number;
  /** "half": refill when fewer than half are posted (Linux, default); "always": at once */
  readonly rxRefill?: "half" | "always";
  /** tx packets in flight at most (default min(queue size, 64)) */
  readonly txSlots?: number;
  /** largest RW payload per packet (default 65536, Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE) */
  readonly maxPacketPayload?: number;
  /** descriptors per tx payload (default 1) */
  readonly txPayloadSegments?: number;
  /** buf_alloc advertised per connection (default 256 KiB, Linux's) */
  readonly bufAlloc?: number;
  /** event buffers (default 8) */
  readonly eventBuffers?: number;
  /** connect() timeout (default 2000 ms, Linux's) */
  readonly connectTimeoutMs?: number;
  /** close() wait for the peer's RST (default 8000 ms, Linux's) */
  readonly closeTimeoutMs?: number;
  /** default timeout of every other wait (default 10000 ms) */
  readonly timeoutMs?: number;
  /** extra device feature bits to ack when offered (e.g. VIRTIO_VSOCK_F_STREAM's mask) */
  readonly ackFeatures?: bigint;
  /** feature bits never to ack */
  readonly withholdFeatures?: bigint;
  /**
   * race: post rx/event buffers and kick after SET_VRING_KICK but before SET_VRING_ENABLE
   * ("never drop a kick": a kick that arrives before the ring is enabled must not be lost)
   */
  readonly kickBeforeEnable?: boolean;
  /** first local port connect() uses (default 1024; Linux picks a random one above 1023) */
  readonly firstEphemeralPort?: number;
}

/** Counters for tests and benchmarks. */
export interface GuestStats {
  /** kicks written, per queue */
  readonly kicks: number[];
  /** call eventfd signals observed, per queue */
  readonly interrupts: number[];
  /** packets taken from the rx used ring */
  rxPackets: number;
  /** packets put on the tx ring */
  txPackets: number;
  /** RW payload bytes received / sent */
  rxBytes: number;
  txBytes: number;
  /** CREDIT_UPDATE packets sent */
  creditUpdatesSent: number;
  /** tx chains the device returned with a non-zero used length */
  txUsedNonZeroLen: number;
  /** kicks not delivered because the front end was closed */
  kicksLost: number;
}

/** One descriptor of a raw chain (`VsockGuest.addRawChain`). */
export interface RawDescriptor {
  /** guest-physical address; a bigint may exceed 2^53 */
  readonly addr: number | bigint;
  readonly len: number;
  /** VRING_DESC_F_* bits, written verbatim (set NEXT yourself) */
  readonly flags: number;
  /** `next` as a position in this list (default: the following one, 0 for the last) */
  readonly next?: number;
  /** `next` as an absolute descriptor-table index (overrides `next`) */
  readonly nextRaw?: number;
}

/** What the device did with a raw chain. */
export interface RawUsed {
  readonly queue: number;
  readonly head: number;
  readonly len: number;
}

/** A packet seen on the rx or tx ring (see `VsockGuest.capture`). */
export interface CapturedPacket {
  readonly direction: "rx" | "tx";
  readonly header: PacketHeader;
  readonly payload: Uint8Array;
}

/** A running capture: `packets` grows until `stop()`. */
export interface PacketCapture {
  readonly packets: CapturedPacket[];
  stop(): void;
}

/** What `snapshot` saved (crosvm profile). */
export interface GuestSnapshot {
  readonly features: bigint;
  readonly bases: readonly number[];
  readonly deviceState: Uint8Array;
}

/** A listening guest port. */
export class GuestListener {
  readonly #queue: GuestConn[] = [];
  #closed = false;

  /** @internal Created by `VsockGuest.listen`. */
  constructor(
    readonly port: number,
    private readonly guest: VsockGuest,
    private readonly onClose: (l: GuestListener) => void,
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
    const deadline = performance.now() + (opts.timeoutMs ?? this.guest.timeoutMs);
    // Several accepts may wait at once: each takes one connection, the others keep waiting.
    for (;;) {
      const c = this.#queue.shift();
      if (c !== undefined) return c;
      if (this.#closed) throw new GuestConnError(`listener on port ${this.port} is closed`);
      await this.guest.waitFor(
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

interface TxSlot {
  readonly index: number;
  readonly block: number;
  readonly hdrGpa: number;
  readonly indirectGpa: number;
  readonly payloadGpa: number;
  readonly hdrView: DataView;
  readonly hdrOff: number;
  readonly payload: Uint8Array;
  /** reused segment list: header + payload segments */
  readonly segs: { gpa: number; len: number; writable: boolean }[];
}

interface RxBuf {
  readonly gpa: number;
  readonly bytes: Uint8Array;
  readonly view: DataView;
}

interface Rings {
  readonly queues: DriverSplitQueue[];
  readonly setups: QueueSetup[];
  readonly blocks: number[];
  readonly rxBufs: RxBuf[];
  readonly rxHead: Int32Array;
  readonly rxFree: number[];
  readonly tx: TxSlot[];
  readonly txHead: Int32Array;
  readonly txFree: number[];
  readonly evBufs: RxBuf[];
  readonly evHead: Int32Array;
  rxPosted: number;
  rxMaxPosted: number;
  readonly dirty: boolean[];
  readonly indirect: boolean;
}

interface Waiter {
  readonly pred: () => boolean;
  readonly resolve: () => void;
  readonly reject: (e: Error) => void;
  readonly deadline: number;
  readonly timeoutMs: number;
  readonly what: string;
}

interface Backlogged {
  readonly conn: GuestConn | null;
  readonly header: PacketHeader;
}

/** The guest driver. Create with `VsockGuest.boot`. */
export class VsockGuest {
  /** the CID read from the config space */
  guestCid = 0;
  /** the virtio features the driver acked */
  features = 0n;
  /** counters */
  readonly stats: GuestStats = {
    kicks: [0, 0, 0],
    interrupts: [0, 0, 0],
    rxPackets: 0,
    txPackets: 0,
    rxBytes: 0,
    txBytes: 0,
    creditUpdatesSent: 0,
    txUsedNonZeroLen: 0,
    kicksLost: 0,
  };
  /** back-end misbehaviour a Linux guest would notice (see the module doc) */
  readonly anomalies: string[] = [];
  /** raw chains (`addRawChain`) the device returned, in order */
  readonly rawUsed: RawUsed[] = [];
  /** default timeout of waits */
  readonly timeoutMs: number;
  /** default close timeout */
  readonly closeTimeoutMs: number;
  /** the guest's RAM */
  readonly memory: GuestRam;

  #fe: VhostUserFrontEnd;
  readonly #opts: VsockGuestOptions;
  #rings: Rings | null = null;
  readonly #conns = new Map<string, GuestConn>();
  readonly #listeners = new Map<number, GuestListener>();
  readonly #backlog: Backlogged[] = [];
  readonly #waiters = new Set<Waiter>();
  readonly #captures = new Set<CapturedPacket[]>();
  /** per queue: heads of raw chains still outstanding */
  readonly #rawHeads: Set<number>[] = [new Set(), new Set(), new Set()];
  readonly #wakeFd = eventFd();
  #pollLoop: Promise<void> | null = null;
  #loopRunning = false;
  #polling = false;
  /** when the outstanding poll times out at the latest */
  #pollEnd = 0;
  #closed = false;
  #rxStarved = false;
  #nextPort: number;
  #pumping = false;
  /** scratch headers: one for received packets, one for outgoing RW packets */
  readonly #rxHdr = new PacketHeader();
  readonly #txHdr = new PacketHeader();
  readonly #connDriver: ConnDriver;

  private constructor(fe: VhostUserFrontEnd, opts: VsockGuestOptions) {
    this.#fe = fe;
    this.#opts = opts;
    this.memory = fe.memory;
    this.timeoutMs = opts.timeoutMs ?? 10000;
    this.closeTimeoutMs = opts.closeTimeoutMs ?? LINUX_CLOSE_TIMEOUT_MS;
    this.#nextPort = opts.firstEphemeralPort ?? 1024;
    const timeouts = { timeoutMs: this.timeoutMs, closeTimeoutMs: this.closeTimeoutMs };
    this.#connDriver = {
      ...timeouts,
      sendControl: (conn, op, flags) => this.#sendConnControl(conn, op, flags),
      sendData: (conn, bytes, off) => this.#sendData(conn, bytes, off),
      canSendData: (conn) => this.#canSendData(conn),
      flush: () => this.#flushAll(),
      waitFor: (pred, timeoutMs, what) => this.waitFor(pred, timeoutMs, what),
      forget: (conn) => this.#forget(conn),
    };
  }

  /** Probes the device through `frontEnd` (see the module doc) and returns the running driver. */
  static async boot(
    frontEnd: VhostUserFrontEnd,
    opts: VsockGuestOptions = {},
  ): Promise<VsockGuest> {
    const g = new VsockGuest(frontEnd, opts);
    try {
      g.#probe();
    } catch (e) {
      await g.close();
      throw e;
    }
    return g;
  }

  /** The front end (VMM) the driver currently talks through. */
  get frontEnd(): VhostUserFrontEnd {
    return this.#fe;
  }

  /** The driver side of virtqueue `index` (0 rx, 1 tx, 2 event), for raw access. */
  queue(index: number): DriverSplitQueue {
    return this.#ringsOrThrow().queues[index];
  }

  /** The rings as laid out in guest memory. */
  get queueSetups(): readonly QueueSetup[] {
    return this.#ringsOrThrow().setups;
  }

  /** Whether INDIRECT_DESC was negotiated (tx chains use indirect tables). */
  get indirect(): boolean {
    return this.#ringsOrThrow().indirect;
  }

  /** Open connections (any state but closed). */
  get connections(): GuestConn[] {
    return [...this.#conns.values()];
  }

  // -------------------------------------------------------------------------------------
  // Probe / remove
  // -------------------------------------------------------------------------------------

  #probe(): void {
    const fe = this.#fe;
    const offered = fe.deviceFeatures();
    this.features = offered & (LINUX_DRIVER_FEATURES | (this.#opts.ackFeatures ?? 0n)) &
      ~(this.#opts.withholdFeatures ?? 0n);
    this.guestCid = fe.readGuestCid();
    const old = this.#rings;
    this.#rings = this.#allocRings(fe.queueSize);
    if (old !== null) { for (const b of old.blocks) this.memory.free(b); }
    const setups = this.#rings.setups;
    if (this.#opts.kickBeforeEnable) {
      fe.startDevice(this.features, setups, { beforeEnable: () => this.#fillQueues() });
    } else {
      fe.startDevice(this.features, setups);
      this.#fillQueues();
    }
  }

  #allocRings(size: number): Rings {
    const m = this.memory;
    const eventIdx = (this.features & featureMask(VIRTIO_RING_F_EVENT_IDX)) !== 0n;
    const indirect = (this.features & featureMask(VIRTIO_RING_F_INDIRECT_DESC)) !== 0n;
    const blocks: number[] = [];
    const alloc = (n: number, align: number) => {
      const g = m.alloc(n, align);
      blocks.push(g);
      return g;
    };
    try {
      const queues: DriverSplitQueue[] = [];
      const setups: QueueSetup[] = [];
      for (let i = 0; i < VSOCK_VQ_COUNT; i++) {
        const probe = compactRingLayout(size, 0, true);
        const base = alloc(probe.end, 4096);
        const l = compactRingLayout(size, base, true);
        queues.push(new DriverSplitQueue(m, size, l.descGpa, l.availGpa, l.usedGpa, { eventIdx }));
        setups.push({
          index: i,
          size,
          descGpa: l.descGpa,
          availGpa: l.availGpa,
          usedGpa: l.usedGpa,
          base: 0,
        });
      }
      const rxBufSize = this.#opts.rxBufSize ?? LINUX_RX_BUF_SIZE;
      const rxCount = Math.min(this.#opts.rxBuffers ?? size, size);
      const rxBufs: RxBuf[] = [];
      for (let i = 0; i < rxCount; i++) {
        rxBufs.push(
          this.#buf(
            alloc(VIRTIO_VSOCK_HDR_SIZE + rxBufSize, 64),
            VIRTIO_VSOCK_HDR_SIZE + rxBufSize,
          ),
        );
      }
      const segsPer = Math.max(1, this.#opts.txPayloadSegments ?? 1);
      const maxPayload = this.#opts.maxPacketPayload ?? 65536;
      const slots = Math.max(1, this.#opts.txSlots ?? Math.min(size, 64));
      const indirectBytes = Math.ceil(descTableSize(1 + segsPer) / 64) * 64;
      const tx: TxSlot[] = [];
      for (let i = 0; i < slots; i++) {
        const block = alloc(64 + indirectBytes + maxPayload, 64);
        const hdr = this.memory.bytesAt(block, 64);
        tx.push({
          index: i,
          block,
          hdrGpa: block,
          indirectGpa: block + 64,
          payloadGpa: block + 64 + indirectBytes,
          hdrView: new DataView(hdr.buffer, hdr.byteOffset, 64),
          hdrOff: 0,
          payload: this.memory.bytesAt(block + 64 + indirectBytes, maxPayload),
          segs: Array.from({ length: 1 + segsPer }, () => ({ gpa: 0, len: 0, writable: false })),
        });
      }
      const evBufs: RxBuf[] = [];
      for (let i = 0; i < (this.#opts.eventBuffers ?? LINUX_EVENT_BUFFERS); i++) {
        evBufs.push(this.#buf(alloc(8, 8), VIRTIO_VSOCK_EVENT_SIZE));
      }
      return {
        queues,
        setups,
        blocks,
        rxBufs,
        rxHead: new Int32Array(size).fill(-1),
        rxFree: rxBufs.map((_, i) => rxCount - 1 - i),
        tx,
        txHead: new Int32Array(size).fill(-1),
        txFree: tx.map((_, i) => slots - 1 - i),
        evBufs,
        evHead: new Int32Array(size).fill(-1),
        rxPosted: 0,
        rxMaxPosted: 0,
        dirty: [false, false, false],
        indirect,
      };
    } catch (e) {
      for (const b of blocks) m.free(b);
      throw e;
    }
  }

  #buf(gpa: number, len: number): RxBuf {
    const bytes = this.memory.bytesAt(gpa, len);
    return { gpa, bytes, view: new DataView(bytes.buffer, bytes.byteOffset, len) };
  }

  /** virtio_vsock_vqs_start: fill rx and event queues, kick. */
  #fillQueues(): void {
    const r = this.#ringsOrThrow();
    this.#fillRx();
    const ev = r.queues[VSOCK_VQ_EVENT];
    for (let i = 0; i < r.evBufs.length; i++) {
      const head = ev.addBuffer([{
        gpa: r.evBufs[i].gpa,
        len: VIRTIO_VSOCK_EVENT_SIZE,
        writable: true,
      }]);
      if (head < 0) break;
      r.evHead[head] = i;
      r.dirty[VSOCK_VQ_EVENT] = true;
    }
    this.#flushAll();
  }

  /** Posts every free rx buffer (like virtio_vsock_rx_fill: until the ring is full). */
  #fillRx(): void {
    const r = this.#ringsOrThrow();
    const rx = r.queues[VSOCK_VQ_RX];
    while (r.rxFree.length > 0) {
      const i = r.rxFree[r.rxFree.length - 1];
      const b = r.rxBufs[i];
      const head = rx.addBuffer([{ gpa: b.gpa, len: b.bytes.length, writable: true }]);
      if (head < 0) break;
      r.rxFree.pop();
      r.rxHead[head] = i;
      r.rxPosted++;
      r.dirty[VSOCK_VQ_RX] = true;
    }
    if (r.rxPosted > r.rxMaxPosted) r.rxMaxPosted = r.rxPosted;
  }

  // -------------------------------------------------------------------------------------
  // Sockets
  // -------------------------------------------------------------------------------------

  /** Listens on guest port `port` (any destination CID, like a socket bound to VMADDR_CID_ANY). */
  listen(port: number): GuestListener {
    this.#checkUsable();
    checkPort(port);
    if (this.#listeners.has(port)) throw new GuestConnError(`guest port ${port} already listening`);
    const l = new GuestListener(port, this, (x) => this.#listeners.delete(x.port));
    this.#listeners.set(port, l);
    return l;
  }

  /**
   * Connects to `cid:port` (default the host, CID 2): REQUEST, then the RESPONSE. Rejects
   * with GuestConnectError on RST ("refused"), on timeout (default 2 s, Linux's) or when a
   * reset drops the attempt.
   */
  async connect(port: number, cid = VSOCK_HOST_CID, opts: WaitOptions = {}): Promise<GuestConn> {
    this.#checkUsable();
    checkPort(port);
    const local = this.#allocPort(cid, port);
    const conn = new GuestConn(this.#connDriver, local, cid, port, this.#bufAlloc(), "connecting");
    this.#conns.set(key(local, cid, port), conn);
    this.#sendConnControl(conn, VIRTIO_VSOCK_OP_REQUEST, 0);
    this.#flushAll();
    const timeoutMs = opts.timeoutMs ?? this.#opts.connectTimeoutMs ?? LINUX_CONNECT_TIMEOUT_MS;
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

  #bufAlloc(): number {
    return this.#opts.bufAlloc ?? LINUX_BUF_ALLOC;
  }

  #allocPort(cid: number, port: number): number {
    for (let i = 0; i < 1 << 20; i++) {
      const p = this.#nextPort;
      this.#nextPort = this.#nextPort >= 0xfffffffe ? 1024 : this.#nextPort + 1;
      if (!this.#conns.has(key(p, cid, port)) && !this.#listeners.has(p)) return p;
    }
    throw new GuestConnError("no free local port");
  }

  #forget(conn: GuestConn): void {
    const k = key(conn.localPort, conn.peerCid, conn.peerPort);
    if (this.#conns.get(k) === conn) this.#conns.delete(k);
  }

  // -------------------------------------------------------------------------------------
  // TX
  // -------------------------------------------------------------------------------------

  #fillHeader(h: PacketHeader, conn: GuestConn, op: number, flags: number): PacketHeader {
    h.reset();
    h.srcCid = this.guestCid;
    h.dstCid = conn.peerCid;
    h.srcPort = conn.localPort;
    h.dstPort = conn.peerPort;
    h.type = VIRTIO_VSOCK_TYPE_STREAM;
    h.op = op;
    h.flags = flags;
    return h;
  }

  #sendConnControl(conn: GuestConn, op: number, flags: number): void {
    const h = this.#fillHeader(new PacketHeader(), conn, op, flags);
    this.#queueControl(conn, h);
  }

  /** Queues a header-only packet: placed now if possible, else in the FIFO backlog. */
  #queueControl(conn: GuestConn | null, h: PacketHeader): void {
    if (this.#backlog.length === 0 && this.#place(conn, h, null, 0, 0) !== null) return;
    this.#backlog.push({ conn, header: h });
  }

  #drainBacklog(): void {
    while (this.#backlog.length > 0) {
      const b = this.#backlog[0];
      if (this.#place(b.conn, b.header, null, 0, 0) === null) return;
      this.#backlog.shift();
    }
  }

  #txDescsNeeded(r: Rings, payloadLen: number): number {
    if (payloadLen === 0) return 1;
    const segs = Math.min(r.tx[0].segs.length - 1, payloadLen);
    return r.indirect ? 1 : 1 + segs;
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
    const r = this.#rings;
    if (r === null) return null;
    const q = r.queues[VSOCK_VQ_TX];
    if (r.txFree.length === 0 || q.numFree < this.#txDescsNeeded(r, n)) return null;
    const slot = r.tx[r.txFree.pop()!];
    if (conn !== null) {
      conn.credit.stamp(h);
      if (h.op === VIRTIO_VSOCK_OP_CREDIT_UPDATE) this.stats.creditUpdatesSent++;
    }
    h.len = n;
    h.encodeTo(slot.hdrView, slot.hdrOff);
    const segs = slot.segs;
    segs[0].gpa = slot.hdrGpa;
    segs[0].len = VIRTIO_VSOCK_HDR_SIZE;
    segs[0].writable = false;
    let count = 1;
    if (n > 0 && bytes !== null) {
      slot.payload.set(bytes.subarray(off, off + n));
      const k = Math.min(segs.length - 1, n);
      const per = Math.ceil(n / k);
      for (let s = 0, p = 0; p < n; s++, p += per) {
        segs[1 + s].gpa = slot.payloadGpa + p;
        segs[1 + s].len = Math.min(per, n - p);
        segs[1 + s].writable = false;
        count++;
      }
    }
    const chain = count === segs.length ? segs : segs.slice(0, count);
    const head = r.indirect && count > 1
      ? q.addBuffer(chain, slot.indirectGpa)
      : q.addBuffer(chain);
    if (head < 0) {
      r.txFree.push(slot.index);
      return null;
    }
    r.txHead[head] = slot.index;
    r.dirty[VSOCK_VQ_TX] = true;
    this.stats.txPackets++;
    this.stats.txBytes += n;
    if (this.#captures.size > 0) {
      this.#capture("tx", h, n > 0 && bytes !== null ? bytes.subarray(off, off + n) : null);
    }
    return slot;
  }

  #canSendData(conn: GuestConn): boolean {
    const r = this.#rings;
    if (r === null || this.#backlog.length > 0 || r.txFree.length === 0) return false;
    return conn.credit.peerFree() > 0 &&
      r.queues[VSOCK_VQ_TX].numFree >= this.#txDescsNeeded(r, Infinity);
  }

  #sendData(conn: GuestConn, bytes: Uint8Array, off: number): number {
    this.#checkUsable();
    let sent = 0;
    const maxPayload = this.#opts.maxPacketPayload ?? 65536;
    while (off + sent < bytes.length && this.#canSendData(conn)) {
      const n = Math.min(bytes.length - off - sent, conn.credit.peerFree(), maxPayload);
      const h = this.#fillHeader(this.#txHdr, conn, VIRTIO_VSOCK_OP_RW, 0);
      if (this.#place(conn, h, bytes, off + sent, n) === null) break;
      conn.credit.consumeTx(n); // n <= peerFree(): never beyond the peer's credit
      conn._sent(n);
      sent += n;
    }
    return sent;
  }

  /**
   * Sends one packet verbatim (no credit accounting, no connection): `header` as given
   * (`len` is set to the payload length unless `keepLen`). For fault injection.
   */
  sendRawPacket(
    header: PacketHeader,
    payload?: Uint8Array,
    opts: { keepLen?: boolean } = {},
  ): void {
    this.#checkUsable();
    const p = payload ?? new Uint8Array(0);
    const h = new PacketHeader().copyFrom(header);
    const len = h.len;
    if (!this.#placeRaw(h, p, opts.keepLen ? len : p.length)) {
      throw new GuestConnError("sendRawPacket: no free tx buffer (pump or wait first)");
    }
    this.#flushAll();
  }

  #placeRaw(h: PacketHeader, p: Uint8Array, lenField: number): boolean {
    const r = this.#ringsOrThrow();
    const maxPayload = r.tx[0].payload.length;
    if (p.length > maxPayload) throw new RangeError(`raw payload > ${maxPayload} bytes`);
    this.#drainBacklog();
    if (this.#backlog.length > 0) return false;
    const slot = this.#place(null, h, p, 0, p.length);
    if (slot === null) return false;
    // HDR_OFF_LEN: claim a payload length other than the bytes actually chained
    if (lenField !== p.length) slot.hdrView.setUint32(slot.hdrOff + 24, lenField >>> 0, true);
    return true;
  }

  // -------------------------------------------------------------------------------------
  // Pumping
  // -------------------------------------------------------------------------------------

  /**
   * Processes everything pending without waiting: recycles tx buffers, dispatches received
   * packets and events, sends queued replies, re-posts rx buffers, kicks as needed, and
   * settles waiters. Returns the number of used elements processed.
   */
  pump(): number {
    if (this.#pumping || this.#rings === null) return 0;
    this.#pumping = true;
    let n = 0;
    try {
      n += this.#processTxUsed();
      this.#drainBacklog();
      n += this.#processRxUsed();
      n += this.#processEvents();
      this.#drainBacklog();
      this.#maybeRefillRx();
      this.#flushAll();
    } finally {
      this.#pumping = false;
    }
    this.#settleWaiters();
    return n;
  }

  /** Drains a used ring like Linux: callbacks off, reap, callbacks on with a re-check. */
  #drain(index: number, each: (head: number, len: number) => void): number {
    const q = this.#rings!.queues[index];
    const raw = this.#rawHeads[index];
    let n = 0;
    for (;;) {
      q.disableCallbacks();
      for (;;) {
        const u = q.popUsed();
        if (u === null) break;
        n++;
        if (raw.size > 0 && raw.delete(u.head)) {
          this.rawUsed.push({ queue: index, head: u.head, len: u.len });
          continue;
        }
        each(u.head, u.len);
      }
      if (!q.enableCallbacks()) break;
    }
    return n;
  }

  #processTxUsed(): number {
    const r = this.#rings!;
    return this.#drain(VSOCK_VQ_TX, (head, len) => {
      const s = head < r.txHead.length ? r.txHead[head] : -1;
      if (s < 0) {
        this.#anomaly(`tx used ring returned head ${head}, which is not outstanding`);
        return;
      }
      r.txHead[head] = -1;
      r.txFree.push(s);
      if (len !== 0) this.stats.txUsedNonZeroLen++;
    });
  }

  #processRxUsed(): number {
    const r = this.#rings!;
    return this.#drain(VSOCK_VQ_RX, (head, len) => {
      const i = head < r.rxHead.length ? r.rxHead[head] : -1;
      if (i < 0) {
        this.#anomaly(`rx used ring returned head ${head}, which is not outstanding`);
        return;
      }
      r.rxHead[head] = -1;
      r.rxFree.push(i);
      r.rxPosted--;
      this.#onRxBuffer(r.rxBufs[i], len);
    });
  }

  #processEvents(): number {
    const r = this.#rings!;
    let reset = false;
    const ev = r.queues[VSOCK_VQ_EVENT];
    const n = this.#drain(VSOCK_VQ_EVENT, (head, len) => {
      const i = head < r.evHead.length ? r.evHead[head] : -1;
      if (i < 0) {
        this.#anomaly(`event used ring returned head ${head}, which is not outstanding`);
        return;
      }
      r.evHead[head] = -1;
      const b = r.evBufs[i];
      if (len < VIRTIO_VSOCK_EVENT_SIZE) {
        this.#anomaly(`event buffer returned with used len ${len} < 4`);
      } else {
        const id = b.view.getUint32(0, true);
        if (id === VIRTIO_VSOCK_EVENT_TRANSPORT_RESET) reset = true;
        else this.#anomaly(`unknown event id ${id}`);
      }
      // virtio_vsock_event_fill_one: re-post at once
      const h = ev.addBuffer([{ gpa: b.gpa, len: VIRTIO_VSOCK_EVENT_SIZE, writable: true }]);
      if (h >= 0) {
        r.evHead[h] = i;
        r.dirty[VSOCK_VQ_EVENT] = true;
      }
    });
    if (reset) this.#onTransportReset();
    return n;
  }

  #maybeRefillRx(): void {
    const r = this.#rings!;
    if (this.#rxStarved || r.rxFree.length === 0) return;
    const policy = this.#opts.rxRefill ?? "half";
    if (policy === "always" || r.rxPosted < r.rxMaxPosted / 2) this.#fillRx();
  }

  #flushAll(): void {
    const r = this.#rings;
    if (r === null) return;
    for (let i = 0; i < VSOCK_VQ_COUNT; i++) {
      if (!r.dirty[i]) continue;
      r.dirty[i] = false;
      const q = r.queues[i];
      q.publish();
      if (q.kickNeeded()) this.#kick(i);
    }
  }

  #kick(i: number): void {
    if (this.#fe.closed) {
      this.stats.kicksLost++;
      return;
    }
    this.stats.kicks[i]++;
    this.#fe.kick(i);
  }

  // -------------------------------------------------------------------------------------
  // RX dispatch
  // -------------------------------------------------------------------------------------

  #onRxBuffer(b: RxBuf, len: number): void {
    if (len < VIRTIO_VSOCK_HDR_SIZE || len > b.bytes.length) {
      this.#anomaly(`rx buffer used with len ${len} (buffer ${b.bytes.length}, header 44)`);
      return;
    }
    const h = this.#rxHdr.decodeFrom(b.view, 0);
    if (h.len > len - VIRTIO_VSOCK_HDR_SIZE) {
      this.#anomaly(`rx packet len ${h.len} exceeds used len ${len} - 44 (${h.describe()})`);
      return;
    }
    this.stats.rxPackets++;
    const payload = b.bytes.subarray(VIRTIO_VSOCK_HDR_SIZE, VIRTIO_VSOCK_HDR_SIZE + h.len);
    if (this.#captures.size > 0) this.#capture("rx", h, payload);
    this.#dispatch(h, payload);
  }

  #dispatch(h: PacketHeader, payload: Uint8Array): void {
    if (h.dstCidHi !== 0 || h.dstCid !== this.guestCid) {
      this.#anomaly(`packet for CID ${h.dstCid} reached guest ${this.guestCid}: ${h.describe()}`);
    }
    if (h.srcCidHi !== 0) this.#anomaly(`src_cid has upper bits set: ${h.describe()}`);
    if (h.len !== 0 && h.op !== VIRTIO_VSOCK_OP_RW) {
      this.#anomaly(`payload on a ${h.op} packet: ${h.describe()}`);
    }
    if (h.type !== VIRTIO_VSOCK_TYPE_STREAM) {
      this.#anomaly(`packet of unsupported type: ${h.describe()}`);
      this.#resetNoSock(h);
      return;
    }
    const conn = this.#conns.get(key(h.dstPort, h.srcCid, h.srcPort));
    if (conn === undefined) {
      const l = this.#listeners.get(h.dstPort);
      if (l !== undefined && h.op === VIRTIO_VSOCK_OP_REQUEST) this.#acceptRequest(l, h);
      else this.#resetNoSock(h);
      return;
    }
    conn.credit.updateFromPeer(h.bufAlloc, h.fwdCnt);
    if (conn.state === "connecting") {
      if (h.op === VIRTIO_VSOCK_OP_RESPONSE) conn._established();
      else if (h.op === VIRTIO_VSOCK_OP_RST) conn._end("refused");
      else {
        this.#anomaly(`unexpected op while connecting: ${h.describe()}`);
        this.#sendConnControl(conn, VIRTIO_VSOCK_OP_RST, 0);
        conn._end("protocol-error");
      }
      return;
    }
    const closing = conn.state === "closing";
    switch (h.op) {
      case VIRTIO_VSOCK_OP_RW:
        if (h.len > 0 && !conn._onData(payload)) {
          this.#anomaly(
            `peer sent ${h.len} bytes beyond the credit we gave (${conn.describe()})`,
          );
        }
        if (!closing) this.stats.rxBytes += h.len;
        break;
      case VIRTIO_VSOCK_OP_CREDIT_UPDATE:
        break;
      case VIRTIO_VSOCK_OP_CREDIT_REQUEST:
        if (!closing) this.#sendConnControl(conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0);
        break;
      case VIRTIO_VSOCK_OP_SHUTDOWN:
        if (conn._onShutdown(h.flags)) {
          if (closing) {
            this.#sendConnControl(conn, VIRTIO_VSOCK_OP_RST, 0);
            conn._end("closed");
          } else if (conn.buffered === 0) {
            this.#sendConnControl(conn, VIRTIO_VSOCK_OP_RST, 0);
            conn._end("peer-closed");
          } else {
            // Linux removes the socket from the table at once; data stays readable.
            this.#forget(conn);
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
      this.#connDriver,
      h.dstPort,
      h.srcCid,
      h.srcPort,
      this.#bufAlloc(),
      "established",
    );
    conn.credit.updateFromPeer(h.bufAlloc, h.fwdCnt);
    this.#conns.set(key(conn.localPort, conn.peerCid, conn.peerPort), conn);
    this.#sendConnControl(conn, VIRTIO_VSOCK_OP_RESPONSE, 0);
    l._push(conn);
  }

  /** virtio_transport_reset_no_sock: RST back, unless the packet is an RST. */
  #resetNoSock(h: PacketHeader): void {
    if (h.op === VIRTIO_VSOCK_OP_RST) return;
    const r = new PacketHeader();
    r.srcCid = h.dstCid;
    r.srcCidHi = h.dstCidHi;
    r.dstCid = h.srcCid;
    r.dstCidHi = h.srcCidHi;
    r.srcPort = h.dstPort;
    r.dstPort = h.srcPort;
    r.type = h.type;
    r.op = VIRTIO_VSOCK_OP_RST;
    this.#queueControl(null, r);
  }

  #onTransportReset(): void {
    this.#dropConnections("transport-reset");
    this.guestCid = this.#fe.readGuestCid();
  }

  #dropConnections(reason: GuestCloseReason): void {
    for (const c of [...this.#conns.values()]) c._end(reason);
    // Packets of dropped connections still waiting for a tx buffer are dropped too.
    for (let i = this.#backlog.length - 1; i >= 0; i--) {
      if (this.#backlog[i].conn !== null) this.#backlog.splice(i, 1);
    }
    for (const l of this.#listeners.values()) l._prune();
  }

  #anomaly(what: string): void {
    this.anomalies.push(what);
  }

  // -------------------------------------------------------------------------------------
  // Capture
  // -------------------------------------------------------------------------------------

  /** Records every packet on the rx and tx rings from now until `stop()` (copies). */
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

  // -------------------------------------------------------------------------------------
  // Waiting
  // -------------------------------------------------------------------------------------

  /**
   * Pumps, and if `pred` does not hold, waits until it does: each time a call eventfd fires
   * (or at most every 100 ms) the rings are pumped and `pred` re-checked. Rejects with
   * GuestTimeoutError after `timeoutMs`, or when the back end hangs up the vhost-user socket.
   */
  waitFor(pred: () => boolean, timeoutMs = this.timeoutMs, what = "a condition"): Promise<void> {
    if (this.#closed) return Promise.reject(new GuestConnError("the guest driver is closed"));
    this.pump();
    if (pred()) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      this.#waiters.add({
        pred,
        resolve,
        reject,
        deadline: Date.now() + timeoutMs,
        timeoutMs,
        what,
      });
      // #loopRunning is cleared synchronously when the loop exits, so a waiter added by a
      // continuation of the last resolved one always finds the loop running or starts one.
      if (!this.#loopRunning) {
        this.#loopRunning = true;
        this.#pollLoop = this.#runPollLoop();
      } else if (this.#polling && Date.now() + timeoutMs < this.#pollEnd) {
        eventFdWrite(this.#wakeFd); // recompute the slice for the earlier deadline
      }
    });
  }

  /** Sleeps `ms` while keeping the rings pumped (e.g. to let a back end misbehave). */
  async idle(ms: number): Promise<void> {
    const until = Date.now() + ms;
    try {
      await this.waitFor(() => Date.now() >= until, ms, `idle ${ms} ms`);
    } catch (e) {
      if (!(e instanceof GuestTimeoutError)) throw e;
    }
  }

  /**
   * The one poll loop: runs while anyone waits. `#loopRunning` is cleared in the same
   * synchronous step as the final "no waiters" check (no await in between), so a waiter added
   * by the continuation of the last resolved one always starts a new loop.
   */
  async #runPollLoop(): Promise<void> {
    try {
      while (this.#waiters.size > 0 && !this.#closed) {
        const fe = this.#fe;
        const fds = [this.#wakeFd];
        const events = [POLLIN];
        const callIdx: number[] = [];
        if (!fe.closed) {
          for (let i = 0; i < VSOCK_VQ_COUNT; i++) {
            fds.push(fe.callFds[i]);
            events.push(POLLIN);
            callIdx.push(i);
          }
          fds.push(fe.socketFd);
          events.push(0);
        }
        let slice = POLL_SLICE_MS;
        const now = Date.now();
        for (const w of this.#waiters) slice = Math.min(slice, Math.max(0, w.deadline - now));
        this.#polling = true;
        this.#pollEnd = now + slice;
        let rev: number[];
        try {
          rev = await pollFdsAsync(fds, events, slice);
        } finally {
          this.#polling = false;
        }
        if (this.#closed) break;
        if (rev[0] & POLLIN) eventFdRead(this.#wakeFd);
        let hangup = false;
        let invalid = false;
        if (fe === this.#fe && !fe.closed) {
          for (let k = 0; k < callIdx.length; k++) {
            if (rev[1 + k] & POLLIN) this.stats.interrupts[callIdx[k]] += fe.takeCall(callIdx[k]);
          }
          const s = rev[fds.length - 1];
          if (s & (POLLHUP | POLLERR)) hangup = true;
          if (rev.some((x) => (x & POLLNVAL) !== 0)) invalid = true;
        }
        this.pump();
        if (hangup || invalid) {
          const why = hangup
            ? "the back end closed the vhost-user connection"
            : "a polled fd is invalid (closed behind the driver's back)";
          for (const w of [...this.#waiters]) {
            this.#waiters.delete(w);
            w.reject(
              new GuestConnError(`while waiting for ${w.what}: ${why}\n${this.describe()}`),
            );
          }
        }
        this.#expireWaiters();
      }
    } catch (e) {
      const err = e instanceof Error ? e : new Error(String(e));
      for (const w of [...this.#waiters]) {
        this.#waiters.delete(w);
        w.reject(err);
      }
    } finally {
      this.#loopRunning = false;
    }
  }

  #settleWaiters(): void {
    if (this.#waiters.size === 0) return;
    for (const w of [...this.#waiters]) {
      let ok: boolean;
      try {
        ok = w.pred();
      } catch (e) {
        this.#waiters.delete(w);
        w.reject(e instanceof Error ? e : new Error(String(e)));
        continue;
      }
      if (ok) {
        this.#waiters.delete(w);
        w.resolve();
      }
    }
    // Nobody waits any more: end the outstanding poll promptly.
    if (this.#waiters.size === 0 && this.#polling) eventFdWrite(this.#wakeFd);
  }

  #expireWaiters(): void {
    const now = Date.now();
    for (const w of [...this.#waiters]) {
      if (now >= w.deadline) {
        this.#waiters.delete(w);
        w.reject(
          new GuestTimeoutError(
            `timed out after ${w.timeoutMs} ms waiting for ${w.what}\n${this.describe()}`,
          ),
        );
      }
    }
  }

  /** A multi-line description of the rings and connections (used in timeout messages). */
  describe(): string {
    const r = this.#rings;
    const lines = [
      `guest cid ${this.guestCid}, front end ${this.#fe.profile}` +
      `${this.#fe.closed ? " (disconnected)" : ""}, anomalies ${this.anomalies.length}`,
    ];
    if (r !== null) {
      const names = ["rx", "tx", "event"];
      for (let i = 0; i < VSOCK_VQ_COUNT; i++) {
        const q = r.queues[i];
        lines.push(
          `  ${names[i]}: avail ${q.availIdx} used ${q.readUsedIdx()} reaped ${q.lastUsed} ` +
            `free descs ${q.numFree} kicks ${this.stats.kicks[i]} interrupts ${
              this.stats.interrupts[i]
            }`,
        );
      }
      lines.push(
        `  rx posted ${r.rxPosted}/${r.rxBufs.length}${this.#rxStarved ? " (starved)" : ""}, ` +
          `tx buffers free ${r.txFree.length}/${r.tx.length}, backlog ${this.#backlog.length}`,
      );
    }
    for (const c of this.#conns.values()) lines.push(`  conn ${c.describe()}`);
    return lines.join("\n");
  }

  // -------------------------------------------------------------------------------------
  // Device life cycle
  // -------------------------------------------------------------------------------------

  /**
   * Driver reset, like `rmmod vmw_vsock_virtio_transport; modprobe ...`: connections are
   * dropped (no packets; `closeReason` "driver-reset"), the front end stops the device
   * (GET_VRING_BASE ...), then the driver probes again: features re-negotiated, CID re-read,
   * new rings at new addresses with base 0, buffers re-posted. Listeners survive.
   */
  resetDevice(): Promise<void> {
    this.#checkUsable();
    this.#dropConnections("driver-reset");
    this.#backlog.length = 0;
    this.#fe.stopDevice();
    this.#probe();
    this.pump();
    return Promise.resolve();
  }

  /**
   * Stops the device (VM pause / crosvm sleep): the front end's stop sequence. Returns the
   * ring bases. Resume with `resume(bases)`.
   */
  suspend(): number[] {
    this.#checkUsable();
    return this.#fe.stopDevice();
  }

  /** Restarts the device after `suspend` at the same ring addresses with `bases`. */
  resume(bases: readonly number[]): void {
    this.#checkUsable();
    this.#fe.startDevice(this.features, this.#setupsWithBases(bases));
    this.pump();
  }

  /**
   * crosvm snapshot: stop the device (SET_VRING_ENABLE 0 + GET_VRING_BASE per queue) and
   * save the back end's state. The guest stays suspended; continue with `resume` on the same
   * back end or `restore` on a new one.
   */
  async snapshot(): Promise<GuestSnapshot> {
    const bases = this.suspend();
    const deviceState = await this.#fe.saveDeviceState();
    return { features: this.features, bases, deviceState };
  }

  /**
   * crosvm restore onto `frontEnd` (a new connection, usually to a new back end, sharing this
   * guest's RAM): SET_FEATURES, load the state, restart the rings with the saved bases, kick
   * every queue. The back end is then expected to send TRANSPORT_RESET on the event queue.
   */
  async restore(frontEnd: VhostUserFrontEnd, snap: GuestSnapshot): Promise<void> {
    this.#checkUsable();
    this.#switchFrontEnd(frontEnd);
    await frontEnd.restoreDevice(
      snap.features,
      snap.deviceState,
      this.#setupsWithBases(snap.bases),
    );
    this.pump();
  }

  /**
   * Re-attaches to a new front end after a disconnect (same guest RAM): the device is started
   * on it with every ring's base at its used index (what a VMM recovers without
   * GET_VRING_BASE). Connections are kept; what the back end forgot is its business.
   */
  attach(frontEnd: VhostUserFrontEnd): void {
    this.#checkUsable();
    this.#switchFrontEnd(frontEnd);
    const r = this.#ringsOrThrow();
    const bases = r.queues.map((q) => q.readUsedIdx());
    frontEnd.startDevice(this.features, this.#setupsWithBases(bases));
    this.pump();
  }

  #switchFrontEnd(frontEnd: VhostUserFrontEnd): void {
    if (frontEnd.memory !== this.memory) {
      throw new Error("the new front end must share the guest's RAM (pass `memory`)");
    }
    this.#fe = frontEnd;
    eventFdWrite(this.#wakeFd);
  }

  /**
   * TRANSPORT_RESET from the VMM (qemu profile: QEMU owns the event queue and sends it after
   * a migration load). With the crosvm profile the back end sends it itself.
   */
  injectTransportReset(): void {
    this.#fe.injectEvent(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
    this.pump();
  }

  #setupsWithBases(bases: readonly number[]): QueueSetup[] {
    return this.#ringsOrThrow().setups.map((s) => ({ ...s, base: bases[s.index] ?? s.base }));
  }

  // -------------------------------------------------------------------------------------
  // Fault hooks (see faults.ts)
  // -------------------------------------------------------------------------------------

  /** Stops (true) or resumes (false) re-posting rx buffers. */
  setRxStarved(starved: boolean): void {
    this.#rxStarved = starved;
  }

  /** Whether rx re-posting is stopped. */
  get rxStarved(): boolean {
    return this.#rxStarved;
  }

  /** rx buffers currently posted. */
  get rxPosted(): number {
    return this.#ringsOrThrow().rxPosted;
  }

  /**
   * Posts every free rx buffer and publishes them; kicks only when `kick` (default true) and
   * the device asks for it. `kick: false` emulates a guest that saw notifications disabled.
   */
  refillRx(opts: { kick?: boolean } = {}): number {
    const r = this.#ringsOrThrow();
    const before = r.rxPosted;
    this.#fillRx();
    const added = r.rxPosted - before;
    if (opts.kick === false) {
      const q = r.queues[VSOCK_VQ_RX];
      q.publish();
      q.kickNeeded(); // consume the decision without acting on it
      r.dirty[VSOCK_VQ_RX] = false;
    } else {
      this.#flushAll();
    }
    return added;
  }

  /**
   * Puts a chain of raw descriptors on queue `index` (malformed chains for robustness tests:
   * out-of-range addresses, loops, nested indirect tables, wrong directions). The descriptor
   * table slots are reserved through the free list, then overwritten verbatim. Publishes, and
   * kicks if the device asks (unless `kick: false`). Returns the head; when the device returns
   * the chain it is recorded in `rawUsed` instead of being dispatched.
   */
  addRawChain(
    index: number,
    descs: readonly RawDescriptor[],
    opts: { kick?: boolean } = {},
  ): number {
    this.#checkUsable();
    const r = this.#ringsOrThrow();
    const q = r.queues[index];
    if (q === undefined) throw new RangeError(`no queue ${index}`);
    if (descs.length === 0) throw new RangeError("a raw chain needs at least one descriptor");
    const placeholder = descs.map(() => ({ gpa: 0, len: 0, writable: false }));
    const head = q.addBuffer(placeholder);
    if (head < 0) throw new GuestConnError(`queue ${index}: ${descs.length} descriptors not free`);
    const idx = [head];
    for (let k = 1; k < descs.length; k++) {
      const at = q.descGpa + idx[k - 1] * VRING_DESC_SIZE + VRING_DESC_NEXT;
      const b = this.memory.bytesAt(at, 2);
      idx.push(b[0] | (b[1] << 8));
    }
    for (let k = 0; k < descs.length; k++) {
      const d = descs[k];
      const next = d.nextRaw ??
        (d.next !== undefined ? idx[d.next] ?? d.next : (k + 1 < descs.length ? idx[k + 1] : 0));
      q.writeDesc(idx[k], d.addr, d.len, d.flags, next);
    }
    this.#rawHeads[index].add(head);
    if (opts.kick === false) {
      q.publish();
      q.kickNeeded();
    } else {
      r.dirty[index] = true;
      this.#flushAll();
    }
    return head;
  }

  /** Publishes and kicks queue `index` as a driver would after adding buffers. */
  flushQueue(index: number): void {
    const r = this.#ringsOrThrow();
    r.dirty[index] = true;
    this.#flushAll();
  }

  /** Kicks queue `index` unconditionally (a spurious notification). */
  kickQueue(index: number): void {
    this.#kick(index);
  }

  // -------------------------------------------------------------------------------------
  // Teardown
  // -------------------------------------------------------------------------------------

  /**
   * Stops waiting: pending waits reject, the poll helper thread finishes. Does not touch the
   * device or the front end (close those separately). Idempotent.
   */
  async close(): Promise<void> {
    if (this.#closed) {
      await this.#pollLoop;
      return;
    }
    this.#closed = true;
    for (const w of [...this.#waiters]) {
      this.#waiters.delete(w);
      w.reject(new GuestConnError(`the guest driver was closed while waiting for ${w.what}`));
    }
    eventFdWrite(this.#wakeFd);
    await this.#pollLoop;
    closeFd(this.#wakeFd); // only after the poll using it returned
    // The RAM may be unmapped next: nothing may touch the rings any more.
    this.#rings = null;
  }

  #checkUsable(): void {
    if (this.#closed) throw new GuestConnError("the guest driver is closed");
  }

  #ringsOrThrow(): Rings {
    if (this.#rings === null) throw new Error("the guest driver has no rings (not probed)");
    return this.#rings;
  }
}

function key(localPort: number, peerCid: number, peerPort: number): string {
  return `${localPort}:${peerCid}:${peerPort}`;
}

function checkPort(port: number): void {
  if (!Number.isInteger(port) || port < 0 || port > 0xffffffff) {
    throw new RangeError(`port ${port} is not a u32`);
  }
}
