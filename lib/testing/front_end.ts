/**
 * A vhost-user front end (the VMM side of `docs/interop/vhost-user.rst`) for tests: it
 * connects to a back end's Unix socket, hands it guest RAM (memfds) and vrings (kick and call
 * eventfds), and replays the message sequences real VMMs send.
 *
 * Layers, one module each:
 * - `vhost_user_channel.ts`: the socket; one message out (header + payload, fds as
 *   SCM_RIGHTS) and its reply in, with timeouts and checks (`VhostUserError`).
 * - `vhost_user_client.ts`: `request()` (which requests get a reply) and the typed helpers,
 *   one per front-end message (`getFeatures`, `setVringAddr`, ...), encoded with
 *   `lib/vhost_user/messages.ts`.
 * - profile sequences (`init`, `startDevice`, `stopDevice`, `restoreDevice`), in the order
 *   the real VMMs use: `profile_qemu.ts` (QEMU 7.2 `vhost-user-vsock-pci`: only rx and tx go
 *   to the back end, QEMU keeps the event queue and injects TRANSPORT_RESET itself, see
 *   `injectEvent`) and `profile_crosvm.ts` (crosvm's `VhostUserFrontend`: all 3 queues go to
 *   the back end; snapshot and restore through DEVICE_STATE, `device_state_transfer.ts`).
 * - `dirty_log.ts`: the SET_LOG_BASE log (`startDirtyLog`).
 *
 * Every message sent is appended to `trace`, so tests can assert a sequence.
 *
 * Guest RAM (`GuestRam`) is independent of the connection: pass the same `memory` to a new
 * front end to reconnect or restore onto another back end with the guest's memory intact.
 * A front end creates one kick and one call eventfd per virtio queue (3 for vsock) and keeps
 * them for its lifetime, like a VMM's ioeventfds and irqfds.
 */

import {
  close,
  connectUnix,
  ECONNREFUSED,
  ENOENT,
  eventFdRead,
  eventFdWrite,
  SysError,
} from "../../ffi/mod.ts";
import {
  VHOST_F_LOG_ALL_MASK as LOG_ALL_MASK,
  VhostUserProtocolFeatureMask as PF,
} from "../vhost_user/protocol.ts";
import {
  featureMask,
  VIRTIO_F_RING_PACKED,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../virtio/features.ts";
import { isValidPackedQueueSize } from "../virtio/packed_layout.ts";
import { isValidQueueSize } from "../virtio/split_layout.ts";
import {
  VIRTIO_VSOCK_CONFIG_SIZE,
  VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
  VSOCK_VQ_EVENT,
} from "../vsock/constants.ts";
import { loadDeviceState, saveDeviceState } from "./device_state_transfer.ts";
import type { DirtyLog } from "./dirty_log.ts";
import { GuestRam, type GuestRamRegionSpec } from "./guest_ram.ts";
import {
  CROSVM_DEFAULT_QUEUE_SIZE,
  CROSVM_GUEST_FEATURES,
  crosvmBackendQueueCount,
  crosvmCreate,
  crosvmReadConfig,
  crosvmStart,
  crosvmStop,
} from "./profile_crosvm.ts";
import {
  QEMU_BACKEND_QUEUE_COUNT,
  QEMU_DEFAULT_QUEUE_SIZE,
  QEMU_GUEST_FEATURES,
  qemuInjectEvent,
  qemuReadConfig,
  qemuRealize,
  qemuStart,
  qemuStop,
} from "./profile_qemu.ts";
import { VhostUserError } from "./vhost_user_channel.ts";
import { type ClientOptions, VhostUserClient } from "./vhost_user_client.ts";
import type { FrontEndProfile, QueueSetup, StartHooks } from "./vmm_profile.ts";

export {
  VIRTIO_CONFIG_S_ACKNOWLEDGE,
  VIRTIO_CONFIG_S_DRIVER,
  VIRTIO_CONFIG_S_DRIVER_OK,
  VIRTIO_CONFIG_S_FAILED,
  VIRTIO_CONFIG_S_FEATURES_OK,
  VIRTIO_CONFIG_S_NEEDS_RESET,
} from "../virtio/device_status.ts";
export type { DirtyLog } from "./dirty_log.ts";
export {
  CROSVM_GUEST_FEATURES,
  CROSVM_PROTOCOL_FEATURES,
  VHOST_USER_CONFIG_FLAG_LIVE_MIGRATION,
  VHOST_USER_CONFIG_FLAG_WRITABLE,
} from "./profile_crosvm.ts";
export { QEMU_7_2_PROTOCOL_FEATURES, QEMU_GUEST_FEATURES } from "./profile_qemu.ts";
export { VhostUserError, type VhostUserReply } from "./vhost_user_channel.ts";
export type {
  DeviceStateFdReply,
  RequestOptions,
  SendOptions,
  TraceEntry,
} from "./vhost_user_client.ts";
export type { FrontEndProfile, QueueSetup, StartHooks } from "./vmm_profile.ts";

/** Options of `VhostUserFrontEnd.connect`. */
export interface FrontEndOptions extends ClientOptions {
  /** which VMM to imitate (default "qemu") */
  readonly profile?: FrontEndProfile;
  /**
   * guest RAM to use (shared with an earlier front end for reconnect/restore); the front end
   * does not close it. Default: new RAM from `regions`, closed by `close()`.
   */
  readonly memory?: GuestRam;
  /** regions of new guest RAM (default one 16 MiB region at gpa 0) */
  readonly regions?: readonly GuestRamRegionSpec[];
  /** back new guest RAM with one memfd at increasing mmap offsets */
  readonly singleMemfd?: boolean;
  /** virtqueue size the VMM offers (default 128 for qemu, 256 for crosvm) */
  readonly queueSize?: number;
  /** offer VIRTIO_RING_F_EVENT_IDX to the guest when the back end has it (default true) */
  readonly eventIdx?: boolean;
  /** offer VIRTIO_RING_F_INDIRECT_DESC to the guest when the back end (and VMM) has it (default true) */
  readonly indirectDesc?: boolean;
  /**
   * offer VIRTIO_F_RING_PACKED to the guest, like QEMU's `packed=on` device property (default
   * false); the back end must offer it, else `deviceFeatures()` (the guest's probe) throws.
   * The testing guest acks it and lays out packed rings.
   */
  readonly packed?: boolean;
  /** ack REPLY_ACK when offered (default true) */
  readonly replyAck?: boolean;
  /** protocol features to ack beyond the profile's (if offered), e.g. DEVICE_STATE for qemu */
  readonly extraProtocolFeatures?: bigint;
  /** protocol features never to ack */
  readonly withheldProtocolFeatures?: bigint;
  /** how long `connect` retries while the socket is missing or refused (default 10000) */
  readonly connectTimeoutMs?: number;
  /** run the profile's realize/create sequence in `connect` (default true) */
  readonly init?: boolean;
}

/** A vhost-user front end over one connection. See the module doc. */
export class VhostUserFrontEnd extends VhostUserClient {
  /** the VMM imitated */
  readonly profile: FrontEndProfile;
  /** the back end's socket */
  readonly socketPath: string;
  /** virtqueue size the VMM offers the guest */
  readonly queueSize: number;

  /** the device config as QEMU cached it at realize (qemu profile), null otherwise */
  configCache: Uint8Array | null = null;

  readonly #opts: FrontEndOptions;
  #ownsMemory: boolean;
  /** qemu: the "masked" call notifiers set at realize */
  readonly #maskedCallFds: number[] = [];
  /** queues as last started, by index */
  #queues: QueueSetup[] = [];
  #started = false;
  /** queues whose ring we stopped without the rest of the stop sequence (stopRings) */
  #ringsStopped: Map<number, number> | null = null;
  /** qemu: the VMM's own view of the event queue (device side), as a vring base */
  #eventBase = 0;

  private constructor(sock: number, socketPath: string, opts: FrontEndOptions) {
    const profile = opts.profile ?? "qemu";
    if (profile !== "qemu" && profile !== "crosvm") {
      throw new RangeError(`unknown front-end profile ${String(profile)}`);
    }
    const queueSize = opts.queueSize ??
      (profile === "qemu" ? QEMU_DEFAULT_QUEUE_SIZE : CROSVM_DEFAULT_QUEUE_SIZE);
    if (!isValidQueueSize(queueSize)) {
      throw new RangeError(`queue size ${queueSize} is not a power of 2 <= 32768`);
    }
    super(
      sock,
      opts.memory ?? new GuestRam({ regions: opts.regions, singleMemfd: opts.singleMemfd }),
      opts,
    );
    this.socketPath = socketPath;
    this.#opts = opts;
    this.profile = profile;
    this.queueSize = queueSize;
    this.#ownsMemory = opts.memory === undefined;
  }

  /**
   * Connects to `socketPath`, retrying (bounded by `connectTimeoutMs`) while the socket file
   * is missing or refuses, or while the back end still serves a previous front end and drops
   * us, then runs the profile's realize sequence unless `init: false`.
   */
  static async connect(
    socketPath: string,
    opts: FrontEndOptions = {},
  ): Promise<VhostUserFrontEnd> {
    const timeoutMs = opts.connectTimeoutMs ?? 10000;
    const deadline = Date.now() + timeoutMs;
    let lastError = "";
    for (;;) {
      let sock = -1;
      try {
        sock = connectUnix(socketPath, { nonblocking: true });
      } catch (e) {
        if (!(e instanceof SysError) || (e.errno !== ENOENT && e.errno !== ECONNREFUSED)) throw e;
        lastError = e.message;
      }
      if (sock >= 0) {
        const fe = new VhostUserFrontEnd(sock, socketPath, opts);
        if (opts.init === false) return fe;
        try {
          fe.init();
          return fe;
        } catch (e) {
          // A back end still serving the previous front end drops us before any reply.
          const refused = e instanceof VhostUserError && fe.repliesReceived === 0 &&
            /closed the connection/.test(e.message);
          fe.close();
          if (!refused) throw e;
          lastError = e.message;
        }
      }
      if (Date.now() >= deadline) {
        throw new VhostUserError(
          `could not connect to the vhost-user back end at ${socketPath} within ${timeoutMs} ms` +
            ` (last error: ${lastError})`,
        );
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** The options this front end was created with (to reconnect alike). */
  get options(): FrontEndOptions {
    return this.#opts;
  }

  /** Makes `close()` also close the guest RAM (hand-over after a reconnect). */
  takeMemoryOwnership(): void {
    this.#ownsMemory = true;
  }

  /** Whether `close()` closes the guest RAM. */
  get ownsMemory(): boolean {
    return this.#ownsMemory;
  }

  /** Whether the rings were started (`startDevice`) and not stopped since. */
  get started(): boolean {
    return this.#started;
  }

  /** Queues as last passed to `startDevice`. */
  get queues(): readonly QueueSetup[] {
    return this.#queues;
  }

  /** Number of virtqueues handed to the back end: 2 (qemu) or GET_QUEUE_NUM, at most 3 (crosvm). */
  get backendQueueCount(): number {
    if (this.profile === "qemu") return QEMU_BACKEND_QUEUE_COUNT;
    return crosvmBackendQueueCount(this.queueNum);
  }

  /** Whether virtqueue `index` is driven by the back end (else by the VMM). */
  ownsQueue(index: number): boolean {
    return index < this.backendQueueCount;
  }

  // -------------------------------------------------------------------------------------
  // Device state
  // -------------------------------------------------------------------------------------

  /**
   * Saves the back end's device state (rings must be stopped): a pipe's write end goes out
   * with SET_DEVICE_STATE_FD(SAVE), the state is read to EOF (awaiting readiness, so other
   * async work keeps running), then CHECK_DEVICE_STATE must report 0. Needs DEVICE_STATE.
   */
  async saveDeviceState(timeoutMs = 5000): Promise<Uint8Array> {
    this.#requireDeviceState(); // inside the async function: a rejection, not a throw
    return await saveDeviceState(this, timeoutMs);
  }

  /**
   * Loads device state into the back end: a pipe's read end goes out with
   * SET_DEVICE_STATE_FD(LOAD), `state` is written and the pipe closed (EOF ends the
   * transfer), then CHECK_DEVICE_STATE must report 0. Needs DEVICE_STATE.
   */
  async loadDeviceState(state: Uint8Array, timeoutMs = 5000): Promise<void> {
    this.#requireDeviceState(); // inside the async function: a rejection, not a throw
    await loadDeviceState(this, state, timeoutMs);
  }

  #requireDeviceState(): void {
    if (!this.hasProtocolFeature(PF.DEVICE_STATE)) {
      throw new VhostUserError(
        `DEVICE_STATE was not negotiated (profile ${this.profile}` +
          `${this.profile === "qemu" ? ": QEMU 7.2 vhost-user-vsock is unmigratable" : ""})`,
      );
    }
  }

  // -------------------------------------------------------------------------------------
  // Notifications
  // -------------------------------------------------------------------------------------

  /**
   * The guest notifies virtqueue `index`: writes its kick eventfd when the back end drives
   * the queue; for a VMM-owned queue (qemu's event queue) the VMM swallows it.
   */
  kick(index: number): void {
    if (this.ownsQueue(index)) eventFdWrite(this.kickFds[index]);
  }

  /** Reads and clears queue `index`'s call eventfd; returns the count (0 = no interrupt). */
  takeCall(index: number): number {
    return Number(eventFdRead(this.callFds[index]));
  }

  // -------------------------------------------------------------------------------------
  // Profile sequences
  // -------------------------------------------------------------------------------------

  /** The realize (qemu) / create (crosvm) sequence. `connect` runs it unless `init: false`. */
  init(): void {
    const choose = (allowed: bigint) => this.#chooseProtocolFeatures(allowed);
    if (this.profile === "qemu") {
      this.configCache = qemuRealize(this, choose, this.#maskedCallFds);
    } else crosvmCreate(this, choose);
  }

  #chooseProtocolFeatures(allowed: bigint): bigint {
    let ack = this.backendProtocolFeatures &
      (allowed | (this.#opts.extraProtocolFeatures ?? 0n));
    ack &= ~(this.#opts.withheldProtocolFeatures ?? 0n);
    if (this.#opts.replyAck === false) ack &= ~PF.REPLY_ACK;
    return ack;
  }

  /**
   * The virtio features the VMM offers the guest: the back end's features filtered by the
   * profile (`QEMU_GUEST_FEATURES`, `CROSVM_GUEST_FEATURES`) and by the eventIdx/indirectDesc
   * options, plus VIRTIO_F_RING_PACKED with the `packed` option (throws if the back end does
   * not offer it).
   */
  deviceFeatures(): bigint {
    const packed = featureMask(VIRTIO_F_RING_PACKED);
    if (this.#opts.packed && (this.backendFeatures & packed) === 0n) {
      throw new VhostUserError(
        "packed: the back end does not offer VIRTIO_F_RING_PACKED (bit 34) in GET_FEATURES " +
          `(0x${this.backendFeatures.toString(16)}); it cannot run packed virtqueues`,
      );
    }
    let f = this.backendFeatures &
      ((this.profile === "qemu" ? QEMU_GUEST_FEATURES : CROSVM_GUEST_FEATURES) |
        (this.#opts.packed ? packed : 0n));
    if (this.#opts.eventIdx === false) f &= ~featureMask(VIRTIO_RING_F_EVENT_IDX);
    if (this.#opts.indirectDesc === false) f &= ~featureMask(VIRTIO_RING_F_INDIRECT_DESC);
    return f;
  }

  /**
   * A guest read of the device config space: qemu answers from the config cached at realize
   * (GET_CONFIG is not sent); crosvm sends GET_CONFIG per 4-byte access (flags WRITABLE), as
   * virtio-pci splits the guest's 64-bit read.
   */
  readConfig(offset: number, size: number): Uint8Array {
    if (this.profile === "qemu") return qemuReadConfig(this.configCache, offset, size);
    return crosvmReadConfig(this, offset, size);
  }

  /** The guest CID from the config space (`readConfig`); throws if the upper 32 bits are set. */
  readGuestCid(): number {
    const v = new DataView(this.readConfig(0, VIRTIO_VSOCK_CONFIG_SIZE).buffer);
    const lo = v.getUint32(0, true);
    const hi = v.getUint32(4, true);
    if (hi !== 0) {
      throw new VhostUserError(
        `config guest_cid has reserved upper bits set: 0x${hi.toString(16)}`,
      );
    }
    return lo;
  }

  /**
   * The driver set DRIVER_OK with `driverFeatures` acked and `queues` laid out: run the
   * profile's start sequence for the queues the back end drives. Queues the VMM keeps
   * (qemu's event queue) are only recorded.
   */
  startDevice(driverFeatures: bigint, queues: readonly QueueSetup[], hooks: StartHooks = {}): void {
    this.checkOpen();
    if (this.#started) throw new Error("startDevice: the device is already started");
    const packed = (driverFeatures & featureMask(VIRTIO_F_RING_PACKED)) !== 0n;
    for (const q of queues) {
      const valid = q.packed ? isValidPackedQueueSize(q.size) : isValidQueueSize(q.size);
      if (!valid || q.size > this.queueSize) {
        throw new RangeError(`queue ${q.index}: size ${q.size} (the VMM offers ${this.queueSize})`);
      }
      if ((q.packed ?? false) !== packed) {
        throw new RangeError(
          `queue ${q.index}: ${q.packed ? "packed" : "split"} layout, but VIRTIO_F_RING_PACKED ` +
            `is ${packed ? "" : "not "}acked`,
        );
      }
    }
    this.#queues = [...queues].sort((a, b) => a.index - b.index);
    const ev = this.#queues.find((q) => q.index === VSOCK_VQ_EVENT);
    this.#eventBase = ev?.base ?? 0;
    const qs = this.#backendQueues();
    if (this.profile === "qemu") qemuStart(this, driverFeatures, qs, hooks, this.#maskedCallFds);
    else crosvmStart(this, driverFeatures, qs, hooks);
    this.#started = true;
  }

  #backendQueues(): QueueSetup[] {
    return this.#queues.filter((q) => this.ownsQueue(q.index));
  }

  /**
   * The device stops (driver reset, VM stop, crosvm sleep): the profile's stop sequence.
   * Returns the bases from GET_VRING_BASE, indexed by queue (VMM-owned queues report the
   * VMM's own position: the next avail index, or a packed ring's `packedRingBase`).
   */
  stopDevice(): number[] {
    this.checkOpen();
    if (!this.#started) throw new Error("stopDevice: the device is not started");
    const qs = this.#backendQueues();
    const bases: number[] = [];
    if (this.profile === "qemu") qemuStop(this, qs, bases);
    else crosvmStop(this, qs, bases);
    for (const q of this.#queues) {
      if (!this.ownsQueue(q.index)) bases[q.index] = this.#eventBase;
    }
    this.#started = false;
    this.#ringsStopped = null;
    return bases;
  }

  /**
   * Stops every back-end ring with GET_VRING_BASE only (no status or enable change), as a
   * mid-transfer suspend; returns the bases. Undo with `restartRings`.
   */
  stopRings(): number[] {
    this.checkOpen();
    if (!this.#started) throw new Error("stopRings: the device is not started");
    const bases: number[] = [];
    const stopped = new Map<number, number>();
    for (const q of this.#backendQueues()) {
      bases[q.index] = this.getVringBase(q.index);
      stopped.set(q.index, bases[q.index]);
    }
    this.#ringsStopped = stopped;
    return bases;
  }

  /**
   * Restarts rings stopped by `stopRings` at the same addresses: SET_VRING_BASE (the bases
   * GET_VRING_BASE returned, or `bases`), SET_VRING_ADDR, SET_VRING_KICK per queue.
   */
  restartRings(bases?: readonly number[]): void {
    this.checkOpen();
    const stopped = this.#ringsStopped;
    if (stopped === null) throw new Error("restartRings: stopRings was not called");
    for (const q of this.#backendQueues()) {
      this.setVringBase(q.index, bases?.[q.index] ?? stopped.get(q.index) ?? q.base);
      this.setVringAddr(q.index, q);
      this.setVringKick(q.index);
    }
    this.#ringsStopped = null;
  }

  /**
   * crosvm's restore onto this (fresh) back end: SET_FEATURES, load `state`
   * (SET_DEVICE_STATE_FD + CHECK_DEVICE_STATE), activate `queues` (which carry the saved
   * bases), then kick every back-end queue as crosvm does after a restore.
   */
  async restoreDevice(
    driverFeatures: bigint,
    state: Uint8Array,
    queues: readonly QueueSetup[],
  ): Promise<void> {
    const features = this.backendFeaturesFor(driverFeatures);
    if (this.ackedFeatures !== features) this.setFeatures(features);
    await this.loadDeviceState(state);
    this.startDevice(driverFeatures, queues);
    for (const q of this.#backendQueues()) this.kick(q.index);
  }

  /**
   * QEMU's event injection (qemu profile: the VMM owns the event queue): takes the next
   * available event buffer as the device, writes `{le32 id}` (default TRANSPORT_RESET), puts
   * it on the used ring and interrupts the guest. Throws if the guest posted no buffer, like
   * QEMU's "vhost-vsock missed transport reset event".
   */
  injectEvent(id = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET): void {
    if (this.ownsQueue(VSOCK_VQ_EVENT)) {
      throw new Error(`${this.profile}: the back end owns the event queue; it sends events itself`);
    }
    const q = this.#queues.find((x) => x.index === VSOCK_VQ_EVENT);
    if (q === undefined) throw new Error("injectEvent: no event queue was set up");
    this.#eventBase = qemuInjectEvent(this.memory, q, this.#eventBase, id);
    eventFdWrite(this.callFds[VSOCK_VQ_EVENT]);
  }

  /**
   * Starts dirty-page logging as QEMU does at migration start: SET_LOG_BASE, SET_FEATURES
   * with LOG_ALL (waiting for it to take effect), SET_VRING_ADDR with VHOST_VRING_F_LOG on
   * every started ring. Returns the log.
   */
  startDirtyLog(): DirtyLog {
    if (this.ackedFeatures === null) throw new Error("startDirtyLog: SET_FEATURES not sent yet");
    const log = this.setLogBase();
    const replyAck = this.hasProtocolFeature(PF.REPLY_ACK);
    this.setFeatures(this.ackedFeatures | LOG_ALL_MASK, { needReply: replyAck });
    if (!replyAck) this.getFeatures();
    if (this.#started) {
      for (const q of this.#backendQueues()) this.setVringAddr(q.index, q, { log: true });
    }
    return log;
  }

  /** Stops dirty-page logging: SET_FEATURES without LOG_ALL, ring addresses without the flag. */
  stopDirtyLog(): void {
    if (this.ackedFeatures === null) return;
    this.setFeatures(this.ackedFeatures & ~LOG_ALL_MASK);
    if (this.#started) { for (const q of this.#backendQueues()) this.setVringAddr(q.index, q); }
    this.closeDirtyLog();
  }

  /**
   * Disconnects: closes the socket and this front end's eventfds, and the guest RAM if this
   * front end owns it (it created it) unless `keepMemory`. Idempotent. Reconnect with a new
   * front end given the same `memory`.
   */
  override close(opts: { keepMemory?: boolean } = {}): void {
    if (this.closed) return;
    super.close();
    for (const fd of this.#maskedCallFds) close(fd);
    this.#started = false;
    if (this.#ownsMemory && !opts.keepMemory) this.memory.close();
  }
}
