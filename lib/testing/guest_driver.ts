/**
 * A virtio-vsock guest driver for tests, behaving like Linux's
 * `net/vmw_vsock/virtio_transport.c` (the virtqueue side) and
 * `virtio_transport_common.c` (the protocol side), on top of a `VhostUserFrontEnd` that plays
 * the VMM. This file is the driver's public face and its device life cycle; the work is split
 * by concern:
 *
 * - guest_rings.ts: the three rings in guest RAM (split, or packed when VIRTIO_F_RING_PACKED
 *   is acked) and the rx / tx / event buffers posted on them and reaped from them (kicks,
 *   notification suppression, refill policy);
 * - guest_transport.ts: connections, listeners, credit, SHUTDOWN / RST and TRANSPORT_RESET
 *   handling, as `virtio_transport_common.c` does it (per-connection state in guest_conn.ts);
 * - guest_wait.ts: waiting (`waitFor`), the one poll loop on the call eventfds, timeouts.
 *
 * Probe (like `virtio_vsock_probe`): negotiate features (the offered subset Linux 6.1 knows:
 * VERSION_1, EVENT_IDX, INDIRECT_DESC, RING_PACKED, VIRTIO_VSOCK_F_SEQPACKET; plus
 * VIRTIO_VSOCK_F_DGRAM, bit 3, as the datagram RFC's driver would, unless `withholdFeatures`
 * says otherwise), read `guest_cid` from the config space, lay out the three rings (rx 0, tx 1,
 * event 2; packed when RING_PACKED was offered and acked) in guest RAM, DRIVER_OK (the front end's
 * `startDevice`), then fill the rx queue (one device-writable descriptor of 44 + 4096 bytes per
 * buffer, until the ring is full) and the event queue (8 buffers of 4 bytes), kicking each.
 *
 * `pump()` processes everything pending without waiting: tx buffers recycled, rx packets
 * dispatched, events handled (TRANSPORT_RESET drops every connection, keeps listeners and
 * re-reads guest_cid), replies sent, rx re-posted, kicks as needed, waiters settled. Call
 * `close()` (or `VmHandle.stop()`) before a test ends so no poll is pending.
 *
 * Anything the back end does that a Linux guest would drop or that breaks the spec (a bad
 * used length, a packet to another CID, data beyond credit, an unknown event) is recorded in
 * `anomalies`; tests should assert it stays empty.
 */

import {
  featureMask,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../virtio/features.ts";
import {
  VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
  VIRTIO_VSOCK_F_DGRAM,
  VIRTIO_VSOCK_F_SEQPACKET,
  VSOCK_HOST_CID,
  VSOCK_VQ_RX,
} from "../vsock/constants.ts";
import { PacketHeader } from "../vsock/packet.ts";
import type { AnyDriverQueue } from "./driver_rings.ts";
import type { QueueSetup, VhostUserFrontEnd } from "./front_end.ts";
import type { GuestRam } from "./guest_ram.ts";
import {
  type GuestCloseReason,
  GuestConn,
  GuestConnError,
  type WaitOptions,
} from "./guest_conn.ts";
import { GuestRings, LINUX_EVENT_BUFFERS, LINUX_RX_BUF_SIZE } from "./guest_rings.ts";
import {
  type BindDgramOptions,
  type GuestDatagram,
  GuestDgramSocket,
  LINUX_RMEM_DEFAULT,
} from "./guest_dgram.ts";
import {
  type ConnectOptions,
  GuestConnectError,
  GuestListener,
  GuestTransport,
  LINUX_BUF_ALLOC,
  LINUX_CONNECT_TIMEOUT_MS,
  type ListenOptions,
} from "./guest_transport.ts";
import {
  type GuestSnapshot,
  type GuestStats,
  newGuestStats,
  type PacketCapture,
  type RawDescriptor,
  type RawUsed,
  type VsockGuestOptions,
} from "./guest_types.ts";
import { GuestTimeoutError, GuestWaits } from "./guest_wait.ts";

export {
  GuestConn,
  GuestConnectError,
  GuestConnError,
  GuestDgramSocket,
  GuestListener,
  GuestTimeoutError,
};
export type {
  BindDgramOptions,
  ConnectOptions,
  GuestCloseReason,
  GuestDatagram,
  ListenOptions,
  WaitOptions,
};
export type { GuestConnState, GuestMessage, SendMessageOptions } from "./guest_conn.ts";
export type * from "./guest_types.ts";
export {
  LINUX_BUF_ALLOC,
  LINUX_CONNECT_TIMEOUT_MS,
  LINUX_EVENT_BUFFERS,
  LINUX_RMEM_DEFAULT,
  LINUX_RX_BUF_SIZE,
};

/** Linux's VSOCK_CLOSE_TIMEOUT (8 s). */
export const LINUX_CLOSE_TIMEOUT_MS = 8000;
/**
 * Features Linux 6.1's virtio-vsock driver acks that this driver implements: the transport
 * features the virtio core keeps (`vring_transport_features`: RING_PACKED among them) and the
 * driver's feature table (VIRTIO_VSOCK_F_SEQPACKET).
 */
export const LINUX_DRIVER_FEATURES: bigint = featureMask(VIRTIO_F_VERSION_1) |
  featureMask(VIRTIO_RING_F_EVENT_IDX) | featureMask(VIRTIO_RING_F_INDIRECT_DESC) |
  featureMask(VIRTIO_F_RING_PACKED) | featureMask(VIRTIO_VSOCK_F_SEQPACKET);
/** What this driver acks when offered: Linux's set plus the datagram RFC's VIRTIO_VSOCK_F_DGRAM. */
export const GUEST_DRIVER_FEATURES: bigint = LINUX_DRIVER_FEATURES |
  featureMask(VIRTIO_VSOCK_F_DGRAM);

/** The guest driver. Create with `VsockGuest.boot`. */
export class VsockGuest {
  /** the CID read from the config space */
  guestCid = 0;
  /** the virtio features the driver acked */
  features = 0n;
  /** counters */
  readonly stats: GuestStats = newGuestStats();
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
  #rings: GuestRings | null = null;
  /** per queue: heads of raw chains still outstanding */
  readonly #rawHeads: Set<number>[] = [new Set(), new Set(), new Set()];
  #rxStarved = false;
  #pumping = false;
  readonly #transport: GuestTransport;
  readonly #waits: GuestWaits;

  private constructor(fe: VhostUserFrontEnd, opts: VsockGuestOptions) {
    this.#fe = fe;
    this.#opts = opts;
    this.memory = fe.memory;
    this.timeoutMs = opts.timeoutMs ?? 10000;
    this.closeTimeoutMs = opts.closeTimeoutMs ?? LINUX_CLOSE_TIMEOUT_MS;
    this.#transport = new GuestTransport({
      opts,
      stats: this.stats,
      anomalies: this.anomalies,
      timeoutMs: this.timeoutMs,
      closeTimeoutMs: this.closeTimeoutMs,
      rings: () => this.#rings,
      cid: () => this.guestCid,
      features: () => this.features,
      checkUsable: () => this.#checkUsable(),
      flush: () => this.#flushAll(),
      waitFor: (pred, timeoutMs, what) => this.waitFor(pred, timeoutMs, what),
    });
    this.#waits = new GuestWaits({
      frontEnd: () => this.#fe,
      pump: () => this.pump(),
      describe: () => this.describe(),
      interrupts: this.stats.interrupts,
    });
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

  /**
   * The driver side of virtqueue `index` (0 rx, 1 tx, 2 event), for raw access: a
   * `DriverSplitQueue`, or a `DriverPackedQueue` when `packed` (tell them apart by `.packed`).
   */
  queue(index: number): AnyDriverQueue {
    return this.#ringsOrThrow().queues[index];
  }

  /** Whether VIRTIO_F_RING_PACKED was negotiated (the rings are packed). */
  get packed(): boolean {
    return this.#ringsOrThrow().packed;
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
    return [...this.#transport.conns.values()];
  }

  // -------------------------------------------------------------------------------------
  // Probe
  // -------------------------------------------------------------------------------------

  #probe(): void {
    const fe = this.#fe;
    const offered = fe.deviceFeatures();
    this.features = offered & (GUEST_DRIVER_FEATURES | (this.#opts.ackFeatures ?? 0n)) &
      ~(this.#opts.withholdFeatures ?? 0n);
    this.guestCid = fe.readGuestCid();
    const old = this.#rings;
    this.#rings = GuestRings.alloc(
      {
        memory: this.memory,
        opts: this.#opts,
        stats: this.stats,
        anomalies: this.anomalies,
        rawHeads: this.#rawHeads,
        rawUsed: this.rawUsed,
      },
      fe.queueSize,
      this.features,
    );
    old?.release();
    // Raw chains still outstanding were on the old rings, which are gone: the new rings hand
    // out the same ids to the driver's own buffers.
    for (const heads of this.#rawHeads) heads.clear();
    const setups = this.#rings.setups;
    if (this.#opts.kickBeforeEnable) {
      fe.startDevice(this.features, setups, { beforeEnable: () => this.#fillQueues() });
    } else {
      fe.startDevice(this.features, setups);
      this.#fillQueues();
    }
  }

  /** virtio_vsock_vqs_start: fill rx and event queues, kick. */
  #fillQueues(): void {
    this.#ringsOrThrow().fillQueues();
    this.#flushAll();
  }

  // -------------------------------------------------------------------------------------
  // Sockets
  // -------------------------------------------------------------------------------------

  /**
   * Listens on guest port `port` (any destination CID, like a socket bound to VMADDR_CID_ANY)
   * with a stream (default) or seqpacket socket; a REQUEST of the other type gets an RST.
   */
  listen(port: number, opts: ListenOptions = {}): GuestListener {
    return this.#transport.listen(port, opts);
  }

  /**
   * Connects to `cid:port` (default the host, CID 2) with a stream (default) or seqpacket
   * socket: REQUEST, then the RESPONSE. Rejects with GuestConnectError on RST ("refused"), on
   * timeout (default 2 s, Linux's), when a reset drops the attempt, or at once for seqpacket
   * without VIRTIO_VSOCK_F_SEQPACKET (ESOCKTNOSUPPORT).
   */
  connect(port: number, cid = VSOCK_HOST_CID, opts: ConnectOptions = {}): Promise<GuestConn> {
    return this.#transport.connect(port, cid, opts);
  }

  /**
   * Binds a datagram socket to guest port `port` (needs VIRTIO_VSOCK_F_DGRAM, else
   * GuestConnError). See guest_dgram.ts.
   */
  bindDgram(port: number, opts: BindDgramOptions = {}): GuestDgramSocket {
    return this.#transport.bindDgram(port, opts);
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
    if (!this.#transport.placeRaw(this.#ringsOrThrow(), h, p, opts.keepLen ? len : p.length)) {
      throw new GuestConnError("sendRawPacket: no free tx buffer (pump or wait first)");
    }
    this.#flushAll();
  }

  /** Records every packet on the rx and tx rings from now until `stop()` (copies). */
  capture(): PacketCapture {
    return this.#transport.capture();
  }

  // -------------------------------------------------------------------------------------
  // Pumping and waiting
  // -------------------------------------------------------------------------------------

  /**
   * Processes everything pending without waiting: recycles tx buffers, dispatches received
   * packets and events, sends queued replies, re-posts rx buffers, kicks as needed, and
   * settles waiters. Returns the number of used elements processed.
   */
  pump(): number {
    const r = this.#rings;
    if (this.#pumping || r === null) return 0;
    this.#pumping = true;
    const t = this.#transport;
    let n = 0;
    try {
      n += r.reapTx();
      t.drainBacklog();
      n += r.reapRx((b, len) => t.onRxBuffer(b, len));
      n += r.reapEvents(() => this.#onTransportReset());
      t.drainBacklog();
      r.maybeRefillRx(this.#rxStarved);
      this.#flushAll();
    } finally {
      this.#pumping = false;
    }
    this.#waits.settle();
    return n;
  }

  #onTransportReset(): void {
    this.#transport.dropConnections("transport-reset");
    this.guestCid = this.#fe.readGuestCid();
  }

  #flushAll(): void {
    this.#rings?.flush((i) => this.#kick(i));
  }

  #kick(i: number): void {
    if (this.#fe.closed) {
      this.stats.kicksLost++;
      return;
    }
    this.stats.kicks[i]++;
    this.#fe.kick(i);
  }

  /**
   * Pumps, and if `pred` does not hold, waits until it does: each time a call eventfd fires
   * (or at most every 100 ms) the rings are pumped and `pred` re-checked. Rejects with
   * GuestTimeoutError after `timeoutMs`, or when the back end hangs up the vhost-user socket.
   */
  waitFor(pred: () => boolean, timeoutMs = this.timeoutMs, what = "a condition"): Promise<void> {
    return this.#waits.waitFor(pred, timeoutMs, what);
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

  /** A multi-line description of the rings and connections (used in timeout messages). */
  describe(): string {
    const lines = [
      `guest cid ${this.guestCid}, front end ${this.#fe.profile}` +
      `${this.#fe.closed ? " (disconnected)" : ""}, anomalies ${this.anomalies.length}`,
    ];
    this.#rings?.describe(lines, this.#rxStarved, this.#transport.backlog.length);
    for (const c of this.#transport.conns.values()) lines.push(`  conn ${c.describe()}`);
    return lines.join("\n");
  }

  // -------------------------------------------------------------------------------------
  // Device life cycle
  // -------------------------------------------------------------------------------------

  /**
   * Driver reset, like `rmmod vmw_vsock_virtio_transport; modprobe ...`: connections are
   * dropped (no packets; `closeReason` "driver-reset"), the front end stops the device
   * (GET_VRING_BASE ...), then the driver probes again: features re-negotiated, CID re-read,
   * new rings at new addresses with fresh bases, buffers re-posted. Listeners survive; raw
   * chains still on the old rings are forgotten (they never show up in `rawUsed`).
   */
  resetDevice(): Promise<void> {
    this.#checkUsable();
    this.#transport.dropConnections("driver-reset");
    this.#transport.backlog.length = 0;
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
   * GET_VRING_BASE; packed: the used slot and wrap counter for both halves of the base).
   * Connections are kept; what the back end forgot is its business.
   */
  attach(frontEnd: VhostUserFrontEnd): void {
    this.#checkUsable();
    this.#switchFrontEnd(frontEnd);
    const r = this.#ringsOrThrow();
    const bases = r.queues.map((q) => q.recoveredBase());
    frontEnd.startDevice(this.features, this.#setupsWithBases(bases));
    this.pump();
  }

  #switchFrontEnd(frontEnd: VhostUserFrontEnd): void {
    if (frontEnd.memory !== this.memory) {
      throw new Error("the new front end must share the guest's RAM (pass `memory`)");
    }
    this.#fe = frontEnd;
    this.#waits.wake();
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
    r.fillRx();
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
    const head = r.addRawChain(index, descs);
    if (opts.kick === false) {
      const q = r.queues[index];
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
    if (!(await this.#waits.close())) return;
    // The RAM may be unmapped next: nothing may touch the rings any more.
    this.#rings = null;
  }

  #checkUsable(): void {
    if (this.#waits.closed) throw new GuestConnError("the guest driver is closed");
  }

  #ringsOrThrow(): GuestRings {
    if (this.#rings === null) throw new Error("the guest driver has no rings (not probed)");
    return this.#rings;
  }
}
