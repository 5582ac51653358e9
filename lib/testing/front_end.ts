/**
 * A vhost-user front end (the VMM side of `docs/interop/vhost-user.rst`) for tests: it
 * connects to a back end's Unix socket, hands it guest RAM (memfds) and vrings (kick and call
 * eventfds), and replays the message sequences real VMMs send.
 *
 * Layers:
 * - `request()`: one message out (header + payload, fds as SCM_RIGHTS), and, when the protocol
 *   says one comes back, its reply in (a synchronous `recvmsg` behind a `poll` timeout: the back
 *   end is another process, so blocking this thread briefly costs nothing). Timeouts, EOF and
 *   malformed or mismatched replies throw `VhostUserError` naming the request.
 * - typed helpers, one per front-end message (`getFeatures`, `setVringAddr`, ...), which
 *   encode with `lib/vhost_user/messages.ts`, translate guest-physical ring addresses to
 *   front-end virtual addresses, and throw when a REPLY_ACK reports failure.
 * - profile sequences (`init`, `startDevice`, `stopDevice`, `restoreDevice`), in the order
 *   the real VMMs use:
 *
 *   `qemu` = QEMU 7.2 `vhost-user-vsock-pci` (hw/virtio/vhost-user-vsock.c, vhost.c,
 *   vhost-user.c). Realize: GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (the
 *   offered bits QEMU 7.2 knows, MQ..STATUS: it never acks DEVICE_STATE; it refuses a back end
 *   without CONFIG), GET_QUEUE_NUM (MQ), GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS), SET_OWNER,
 *   GET_FEATURES, SET_VRING_CALL per queue with a "masked" notifier, GET_CONFIG (8 bytes,
 *   cached: the guest's config reads never reach the back end). Driver start (DRIVER_OK):
 *   SET_FEATURES, [GET_STATUS, SET_STATUS |FEATURES_OK], the memory table (ADD_MEM_REG per
 *   region not yet announced when CONFIGURE_MEM_SLOTS is acked, else SET_MEM_TABLE; with
 *   NEED_REPLY under REPLY_ACK), per queue SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR,
 *   SET_VRING_KICK, then SET_VRING_ENABLE 1 per queue, [GET_STATUS, SET_STATUS
 *   |ACKNOWLEDGE|DRIVER|DRIVER_OK], and finally SET_VRING_CALL with the real call eventfd
 *   ("unmask"). Only rx (0) and tx (1) go to the back end: QEMU keeps the event queue and
 *   injects TRANSPORT_RESET itself (`injectEvent`). Stop: [SET_STATUS 0], SET_VRING_ENABLE 0,
 *   GET_VRING_BASE per queue. Waits QEMU makes without REPLY_ACK use GET_FEATURES as a barrier.
 *
 *   `crosvm` = crosvm's `VhostUserFrontend` (devices/src/virtio/vhost_user_frontend). Create:
 *   SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (CONFIG, MQ,
 *   DEVICE_STATE, REPLY_ACK as offered; crosvm also wants BACKEND_REQ and SHMEM, which this
 *   library withholds because it serves no back-end requests), GET_QUEUE_NUM: all 3 queues,
 *   the event queue included, go to the back end. Config reads: GET_CONFIG per guest access
 *   (two 4-byte reads for the le64 CID, flags WRITABLE). Activate: SET_FEATURES (when changed),
 *   SET_MEM_TABLE, per queue SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_CALL,
 *   SET_VRING_KICK, SET_VRING_ENABLE 1 (only when PROTOCOL_FEATURES was acked). Sleep/reset:
 *   per queue SET_VRING_ENABLE 0, GET_VRING_BASE. Snapshot: SET_DEVICE_STATE_FD(save) + read
 *   to EOF + CHECK_DEVICE_STATE; restore: SET_FEATURES, SET_DEVICE_STATE_FD(load) + write +
 *   CHECK_DEVICE_STATE, activate with the saved bases, then a kick on every queue. crosvm
 *   negotiates REPLY_ACK but never sets NEED_REPLY.
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
  EAGAIN,
  ECONNREFUSED,
  ENOENT,
  eventFd,
  eventFdRead,
  eventFdWrite,
  type Mapping,
  mapShared,
  memfdCreate,
  pipe,
  POLLERR,
  pollFds,
  pollFdsAsync,
  POLLHUP,
  POLLIN,
  POLLOUT,
  readRaw,
  recvWithFds,
  sendWithFds,
  setNonBlocking,
  SysError,
  unmap,
  writeRaw,
} from "../../ffi/mod.ts";
import {
  CodecError,
  decodeConfig,
  decodeHeader,
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
  isReply,
  type MemoryRegion,
  type VringAddr,
} from "../vhost_user/messages.ts";
import {
  ALWAYS_REPLIED_REQUESTS,
  requestName,
  VHOST_F_LOG_ALL_MASK as LOG_ALL_MASK,
  VHOST_LOG_PAGE,
  VHOST_MEMORY_BASELINE_NREGIONS,
  VHOST_TRANSFER_STATE_DIRECTION_LOAD,
  VHOST_TRANSFER_STATE_DIRECTION_SAVE,
  VHOST_TRANSFER_STATE_PHASE_STOPPED,
  VHOST_USER_DEVICE_STATE_ERROR_MASK,
  VHOST_USER_DEVICE_STATE_NOFD_MASK,
  VHOST_USER_F_PROTOCOL_FEATURES_MASK as PROTOCOL_FEATURES_MASK,
  VHOST_USER_HDR_SIZE,
  VHOST_USER_MAX_PAYLOAD_SIZE,
  VHOST_USER_REPLY_MASK,
  VHOST_USER_VERSION,
  VHOST_USER_VERSION_MASK,
  VHOST_VRING_F_LOG,
  VhostUserProtocolFeatureMask as PF,
  VhostUserRequest as R,
} from "../vhost_user/protocol.ts";
import {
  featureMask,
  VIRTIO_F_NOTIFY_ON_EMPTY,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../virtio/features.ts";
import {
  availElemOffset,
  isValidQueueSize,
  usedElemOffset,
  VRING_AVAIL_IDX,
  VRING_DESC_F_WRITE,
  VRING_DESC_SIZE,
  VRING_USED_IDX,
} from "../virtio/split_layout.ts";
import {
  VIRTIO_VSOCK_CONFIG_SIZE,
  VIRTIO_VSOCK_EVENT_SIZE,
  VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
  VIRTIO_VSOCK_F_SEQPACKET,
  VSOCK_VQ_COUNT,
  VSOCK_VQ_EVENT,
} from "../vsock/constants.ts";
import { GuestRam, type GuestRamRegion, type GuestRamRegionSpec } from "./guest_ram.ts";

// ---------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------

/** Which VMM the front end imitates. */
export type FrontEndProfile = "qemu" | "crosvm";

/** Device status bit (virtio 1.3, 2.1 "Device Status Field"): the guest found the device. */
export const VIRTIO_CONFIG_S_ACKNOWLEDGE = 1;
/** Device status bit: the guest has a driver for the device. */
export const VIRTIO_CONFIG_S_DRIVER = 2;
/** Device status bit: the driver is set up and ready to drive the device. */
export const VIRTIO_CONFIG_S_DRIVER_OK = 4;
/** Device status bit: feature negotiation is complete. */
export const VIRTIO_CONFIG_S_FEATURES_OK = 8;
/** Device status bit: the device hit an error and needs a reset. */
export const VIRTIO_CONFIG_S_NEEDS_RESET = 0x40;
/** Device status bit: the guest gave up on the device. */
export const VIRTIO_CONFIG_S_FAILED = 0x80;

/** GET_CONFIG / SET_CONFIG flag as crosvm names it (`VhostUserConfigFlags::WRITABLE`). */
export const VHOST_USER_CONFIG_FLAG_WRITABLE = 0x1;
/** GET_CONFIG / SET_CONFIG flag: access during live migration (`LIVE_MIGRATION`). */
export const VHOST_USER_CONFIG_FLAG_LIVE_MIGRATION = 0x2;

/** Protocol features QEMU 7.2 knows (`VHOST_USER_PROTOCOL_F_MAX` = 17): MQ (0) .. STATUS (16). */
export const QEMU_7_2_PROTOCOL_FEATURES: bigint = (1n << 17n) - 1n;

/**
 * Protocol features crosvm's front end acks when offered, minus BACKEND_REQ and SHMEM which
 * this library withholds (it does not serve back-end requests).
 */
export const CROSVM_PROTOCOL_FEATURES: bigint = PF.CONFIG | PF.MQ | PF.DEVICE_STATE | PF.REPLY_ACK;

/**
 * Virtio features QEMU 7.2 lets a vhost-user-vsock back end offer to the guest: the device's
 * `user_feature_bits` and vhost-vsock-common's `feature_bits` that QEMU's virtio-pci offers by
 * default (VERSION_1, INDIRECT_DESC, EVENT_IDX, NOTIFY_ON_EMPTY) plus SEQPACKET.
 * `VIRTIO_VSOCK_F_STREAM` is not among them: QEMU never passes bit 0 to the guest.
 */
export const QEMU_GUEST_FEATURES: bigint = featureMask(VIRTIO_F_VERSION_1) |
  featureMask(VIRTIO_RING_F_INDIRECT_DESC) | featureMask(VIRTIO_RING_F_EVENT_IDX) |
  featureMask(VIRTIO_F_NOTIFY_ON_EMPTY) | featureMask(VIRTIO_VSOCK_F_SEQPACKET);

/**
 * Virtio features crosvm passes from a vhost-user back end to the guest: every
 * device-specific bit (0..23) plus its `base_features` VERSION_1 and EVENT_IDX. crosvm does
 * not offer INDIRECT_DESC or NOTIFY_ON_EMPTY.
 */
export const CROSVM_GUEST_FEATURES: bigint = ((1n << 24n) - 1n) | featureMask(VIRTIO_F_VERSION_1) |
  featureMask(VIRTIO_RING_F_EVENT_IDX);

const EMPTY = new Uint8Array(0);

// ---------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------

/** A failed vhost-user exchange: timeout, EOF, a malformed or unexpected reply, a NACK. */
export class VhostUserError extends Error {
  override name = "VhostUserError";
}

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

/** A reply as read from the socket. The caller owns `fds`. */
export interface VhostUserReply {
  readonly request: number;
  readonly flags: number;
  readonly payload: Uint8Array;
  readonly fds: number[];
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

/** A virtqueue as the driver laid it out in guest memory. */
export interface QueueSetup {
  /** virtqueue index: 0 rx, 1 tx, 2 event */
  readonly index: number;
  /** entries (a power of 2) */
  readonly size: number;
  readonly descGpa: number;
  readonly availGpa: number;
  readonly usedGpa: number;
  /** next available index the device should process (SET_VRING_BASE) */
  readonly base: number;
}

/** Hooks into `startDevice` for race tests. */
export interface StartHooks {
  /** runs after the rings are set up (kick fds sent) and before any SET_VRING_ENABLE */
  readonly beforeEnable?: () => void;
}

/** Options of `VhostUserFrontEnd.connect`. */
export interface FrontEndOptions {
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
  /** ack REPLY_ACK when offered (default true) */
  readonly replyAck?: boolean;
  /** use VHOST_USER_F_PROTOCOL_FEATURES when offered (default true) */
  readonly protocolFeatures?: boolean;
  /** protocol features to ack beyond the profile's (if offered), e.g. DEVICE_STATE for qemu */
  readonly extraProtocolFeatures?: bigint;
  /** protocol features never to ack */
  readonly withheldProtocolFeatures?: bigint;
  /** set NEED_REPLY on every request without its own reply and wait for the ack */
  readonly needReplyAll?: boolean;
  /** how long `connect` retries while the socket is missing or refused (default 10000) */
  readonly connectTimeoutMs?: number;
  /** how long to wait for each reply (default 5000) */
  readonly replyTimeoutMs?: number;
  /** run the profile's realize/create sequence in `connect` (default true) */
  readonly init?: boolean;
}

/** A dirty-page log handed to the back end with SET_LOG_BASE (one bit per 4 KiB page). */
export interface DirtyLog {
  /** the log bytes, live (bit `n % 8` of byte `n / 8` = page n) */
  readonly bytes: Uint8Array;
  /** whether the page holding guest-physical `gpa` is marked dirty */
  isDirty(gpa: number): boolean;
  /** whether every page of [gpa, gpa+len) is marked dirty */
  isRangeDirty(gpa: number, len: number): boolean;
  /** guest-physical addresses of the dirty pages, ascending */
  dirtyPages(): number[];
  /** clears every bit */
  clear(): void;
  /** unmaps the log and closes its memfd */
  close(): void;
}

/** SET_DEVICE_STATE_FD's reply, decoded. */
export interface DeviceStateFdReply {
  /** bits 0-7 of the reply (0 = success) */
  readonly error: number;
  /** the back end's own fd to use instead of ours (reply bit 8 clear), or null */
  readonly backendFd: number | null;
}

// ---------------------------------------------------------------------------------------
// The front end
// ---------------------------------------------------------------------------------------

/** A vhost-user front end over one connection. See the module doc. */
export class VhostUserFrontEnd {
  /** the VMM imitated */
  readonly profile: FrontEndProfile;
  /** guest RAM (shared or owned, see `FrontEndOptions.memory`) */
  readonly memory: GuestRam;
  /** the back end's socket */
  readonly socketPath: string;
  /** every message sent, in order */
  readonly trace: TraceEntry[] = [];
  /** virtqueue size the VMM offers the guest */
  readonly queueSize: number;
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
  /** the device config as QEMU cached it at realize (qemu profile), null otherwise */
  configCache: Uint8Array | null = null;

  readonly #opts: FrontEndOptions;
  #ownsMemory: boolean;
  readonly #replyTimeoutMs: number;
  readonly #maskedCallFds: number[] = [];
  /** regions the back end was told about (SET_MEM_TABLE / ADD_MEM_REG) */
  readonly #announced = new Set<GuestRamRegion>();
  #sock: number;
  #closed = false;
  /** queues as last started, by index */
  #queues: QueueSetup[] = [];
  #started = false;
  /** queues whose ring we stopped without the rest of the stop sequence (stopRings) */
  #ringsStopped: Map<number, number> | null = null;
  /** qemu: the VMM's own view of the event queue (device side) */
  #eventLastAvail = 0;
  #dirtyLog: DirtyLog | null = null;
  #repliesReceived = 0;
  /** bytes read from the socket but not yet consumed (a reply split across reads) */
  #rxBuf = new Uint8Array(VHOST_USER_HDR_SIZE + VHOST_USER_MAX_PAYLOAD_SIZE);

  private constructor(sock: number, socketPath: string, opts: FrontEndOptions) {
    this.#sock = sock;
    this.socketPath = socketPath;
    this.#opts = opts;
    this.profile = opts.profile ?? "qemu";
    if (this.profile !== "qemu" && this.profile !== "crosvm") {
      throw new RangeError(`unknown front-end profile ${String(this.profile)}`);
    }
    this.queueSize = opts.queueSize ?? (this.profile === "qemu" ? 128 : 256);
    if (!isValidQueueSize(this.queueSize)) {
      throw new RangeError(`queue size ${this.queueSize} is not a power of 2 <= 32768`);
    }
    this.#replyTimeoutMs = opts.replyTimeoutMs ?? 5000;
    this.#ownsMemory = opts.memory === undefined;
    this.memory = opts.memory ??
      new GuestRam({ regions: opts.regions, singleMemfd: opts.singleMemfd });
    const kicks: number[] = [];
    const calls: number[] = [];
    for (let i = 0; i < VSOCK_VQ_COUNT; i++) {
      kicks.push(eventFd());
      calls.push(eventFd());
    }
    this.kickFds = kicks;
    this.callFds = calls;
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
          const refused = e instanceof VhostUserError && fe.#repliesReceived === 0 &&
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

  /** The socket fd (for polling for HUP); -1 once closed. */
  get socketFd(): number {
    return this.#sock;
  }

  /** Whether `close()` was called. */
  get closed(): boolean {
    return this.#closed;
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
    if (this.profile === "qemu") return 2;
    return Math.min(this.queueNum ?? VSOCK_VQ_COUNT, VSOCK_VQ_COUNT);
  }

  /** Whether virtqueue `index` is driven by the back end (else by the VMM). */
  ownsQueue(index: number): boolean {
    return index < this.backendQueueCount;
  }

  /** Whether VHOST_USER_F_PROTOCOL_FEATURES is in use (offered, and not refused by options). */
  get protocolFeaturesOn(): boolean {
    return (this.backendFeatures & PROTOCOL_FEATURES_MASK) !== 0n &&
      this.#opts.protocolFeatures !== false;
  }

  /** Whether protocol feature `mask` (a `VhostUserProtocolFeatureMask` value) was acked. */
  hasProtocolFeature(mask: bigint): boolean {
    return (this.ackedProtocolFeatures & mask) !== 0n;
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
    this.#checkOpen();
    const needReply = opts.needReply ?? false;
    const msg = encodeRequest(req, payload, needReply);
    const flags = new DataView(msg.buffer).getUint32(4, true);
    this.trace.push({ request: req, name: requestName(req), flags, payload, fds: fds.length });
    this.#sendAll(msg, fds, req);
    const expect = opts.expectReply ??
      (ALWAYS_REPLIED_REQUESTS.has(req) ||
        (req === R.SET_LOG_BASE && this.hasProtocolFeature(PF.LOG_SHMFD)) ||
        (needReply && this.hasProtocolFeature(PF.REPLY_ACK)));
    if (!expect) return null;
    return this.#readReply(req, opts.timeoutMs ?? this.#replyTimeoutMs);
  }

  /** Whether bytes the front end did not ask for are waiting on the socket (a stray reply). */
  hasPendingInput(): boolean {
    this.#checkOpen();
    return (pollFds([this.#sock], [POLLIN], 0)[0] & POLLIN) !== 0;
  }

  #sendAll(msg: Uint8Array, fds: readonly number[], req: number): void {
    let off = 0;
    let first = true;
    const deadline = Date.now() + this.#replyTimeoutMs;
    while (off < msg.length) {
      const n = sendWithFds(this.#sock, msg.subarray(off), first ? fds : []);
      if (n === -EAGAIN) {
        const left = deadline - Date.now();
        if (left <= 0) {
          throw new VhostUserError(`${requestName(req)}: socket send buffer full for too long`);
        }
        pollFds([this.#sock], [POLLOUT], Math.min(left, 100));
        continue;
      }
      if (n < 0) {
        throw new VhostUserError(
          `${requestName(req)}: send failed: ${new SysError("sendmsg", -n).message}` +
            " (the back end closed the connection?)",
        );
      }
      off += n;
      first = false;
    }
  }

  /** Reads exactly `len` bytes into #rxBuf[at..], collecting fds. */
  #recvExactly(at: number, len: number, fds: number[], req: number, deadline: number): void {
    let got = 0;
    while (got < len) {
      const r = recvWithFds(this.#sock, this.#rxBuf.subarray(at + got), len - got);
      if (typeof r === "number") {
        if (r !== -EAGAIN) {
          throw new VhostUserError(
            `${requestName(req)}: receive failed: ${new SysError("recvmsg", -r).message}`,
          );
        }
        const left = deadline - Date.now();
        if (left <= 0) {
          for (const fd of fds) close(fd);
          throw new VhostUserError(
            `${requestName(req)}: no reply from the back end within ${this.#replyTimeoutMs} ms`,
          );
        }
        const rev = pollFds([this.#sock], [POLLIN], Math.min(left, 1000))[0];
        if ((rev & (POLLHUP | POLLERR)) !== 0 && (rev & POLLIN) === 0) {
          throw new VhostUserError(
            `${requestName(req)}: the back end closed the connection before replying`,
          );
        }
        continue;
      }
      fds.push(...r.fds);
      if (r.n === 0) {
        for (const fd of fds) close(fd);
        throw new VhostUserError(
          `${requestName(req)}: the back end closed the connection before replying`,
        );
      }
      got += r.n;
    }
  }

  #readReply(req: number, timeoutMs: number): VhostUserReply {
    const deadline = Date.now() + timeoutMs;
    const fds: number[] = [];
    this.#recvExactly(0, VHOST_USER_HDR_SIZE, fds, req, deadline);
    const raw = new DataView(this.#rxBuf.buffer, 0, VHOST_USER_HDR_SIZE);
    const request = raw.getUint32(0, true);
    const flags = raw.getUint32(4, true);
    const size = raw.getUint32(8, true);
    const fail = (why: string): never => {
      for (const fd of fds) close(fd);
      throw new VhostUserError(`${requestName(req)}: bad reply: ${why}`);
    };
    const hdr = decodeHeader(this.#rxBuf.subarray(0, VHOST_USER_HDR_SIZE));
    if (hdr instanceof CodecError) fail(hdr.message);
    if ((flags & VHOST_USER_VERSION_MASK) !== VHOST_USER_VERSION) fail(`version ${flags & 3}`);
    if (!isReply(flags)) fail(`REPLY flag (0x${VHOST_USER_REPLY_MASK.toString(16)}) not set`);
    if (request !== req) fail(`it answers ${requestName(request)} (stray or out-of-order reply)`);
    if (size > VHOST_USER_MAX_PAYLOAD_SIZE) fail(`payload size ${size}`);
    this.#recvExactly(VHOST_USER_HDR_SIZE, size, fds, req, deadline);
    const payload = this.#rxBuf.slice(VHOST_USER_HDR_SIZE, VHOST_USER_HDR_SIZE + size);
    this.#repliesReceived++;
    return { request, flags, payload, fds };
  }

  /** Sends a request without a reply of its own; with NEED_REPLY + REPLY_ACK checks the ack. */
  #set(req: number, payload: Uint8Array, fds: readonly number[], opts: SendOptions = {}): void {
    const needReply = opts.needReply ??
      (this.#opts.needReplyAll === true && this.hasProtocolFeature(PF.REPLY_ACK));
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

  /**
   * QEMU's `enforce_reply`: wait until the back end processed the previous request. With
   * REPLY_ACK the request carried NEED_REPLY and its ack was read; without it QEMU sends
   * GET_FEATURES, "which makes all backends send a reply".
   */
  #qemuBarrier(): void {
    if (!this.hasProtocolFeature(PF.REPLY_ACK)) this.getFeatures();
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
    ring: { descGpa: number; availGpa: number; usedGpa: number; size: number },
    opts: SendOptions & { log?: boolean } = {},
  ): void {
    const m = this.memory;
    this.setVringAddrRaw({
      index,
      flags: opts.log ? 1 << VHOST_VRING_F_LOG : 0,
      descUser: m.gpaToUser(ring.descGpa, VRING_DESC_SIZE * ring.size),
      availUser: m.gpaToUser(ring.availGpa, 4 + 2 * ring.size),
      usedUser: m.gpaToUser(ring.usedGpa, 4 + 8 * ring.size),
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
    const pages = Math.ceil(this.memory.topGpa / VHOST_LOG_PAGE);
    const size = opts?.size ?? Math.max(8, Math.ceil(pages / 64) * 8);
    const mapSize = Math.ceil(size / 4096) * 4096;
    const fd = memfdCreate("dirty-log", mapSize);
    let m: Mapping;
    try {
      m = mapShared(fd, mapSize, 0);
    } catch (e) {
      close(fd);
      throw e;
    }
    try {
      const reply = this.request(R.SET_LOG_BASE, encodeLog({ mmapSize: size, mmapOffset: 0 }), [
        fd,
      ]);
      if (reply !== null) this.#checkAck(R.SET_LOG_BASE, reply);
    } catch (e) {
      unmap(m);
      close(fd);
      throw e;
    }
    this.#dirtyLog?.close();
    this.#dirtyLog = makeDirtyLog(m, fd, size);
    return this.#dirtyLog;
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

  /**
   * Saves the back end's device state (rings must be stopped): a pipe's write end goes out
   * with SET_DEVICE_STATE_FD(SAVE), the state is read to EOF (awaiting readiness, so other
   * async work keeps running), then CHECK_DEVICE_STATE must report 0. Needs DEVICE_STATE.
   */
  async saveDeviceState(timeoutMs = 5000): Promise<Uint8Array> {
    this.#requireDeviceState();
    const fds = pipe(false);
    let readFd = fds[0];
    let writeFd = fds[1];
    try {
      setNonBlocking(readFd);
      const res = this.setDeviceStateFd(VHOST_TRANSFER_STATE_DIRECTION_SAVE, writeFd);
      close(writeFd); // EOF must come from the back end's copy alone
      writeFd = -1;
      if (res.error !== 0) {
        throw new VhostUserError(`SET_DEVICE_STATE_FD(save) failed: error ${res.error}`);
      }
      if (res.backendFd !== null) {
        close(readFd);
        readFd = res.backendFd;
        setNonBlocking(readFd);
      }
      const data = await readToEof(readFd, timeoutMs, "device state (save)");
      const check = this.checkDeviceState();
      if (check !== 0n) throw new VhostUserError(`CHECK_DEVICE_STATE after save: ${check}`);
      return data;
    } finally {
      close(readFd);
      close(writeFd);
    }
  }

  /**
   * Loads device state into the back end: a pipe's read end goes out with
   * SET_DEVICE_STATE_FD(LOAD), `state` is written and the pipe closed (EOF ends the
   * transfer), then CHECK_DEVICE_STATE must report 0. Needs DEVICE_STATE.
   */
  async loadDeviceState(state: Uint8Array, timeoutMs = 5000): Promise<void> {
    this.#requireDeviceState();
    const fds = pipe(false);
    let readFd = fds[0];
    let writeFd = fds[1];
    try {
      setNonBlocking(writeFd);
      const res = this.setDeviceStateFd(VHOST_TRANSFER_STATE_DIRECTION_LOAD, readFd);
      close(readFd);
      readFd = -1;
      if (res.error !== 0) {
        throw new VhostUserError(`SET_DEVICE_STATE_FD(load) failed: error ${res.error}`);
      }
      if (res.backendFd !== null) {
        close(writeFd);
        writeFd = res.backendFd;
        setNonBlocking(writeFd);
      }
      await writeAllFd(writeFd, state, timeoutMs, "device state (load)");
      close(writeFd); // EOF ends the transfer
      writeFd = -1;
      const check = this.checkDeviceState();
      if (check !== 0n) throw new VhostUserError(`CHECK_DEVICE_STATE after load: ${check}`);
    } finally {
      close(readFd);
      close(writeFd);
    }
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
    if (this.profile === "qemu") this.#initQemu();
    else this.#initCrosvm();
  }

  #chooseProtocolFeatures(allowed: bigint): bigint {
    let ack = this.backendProtocolFeatures &
      (allowed | (this.#opts.extraProtocolFeatures ?? 0n));
    ack &= ~(this.#opts.withheldProtocolFeatures ?? 0n);
    if (this.#opts.replyAck === false) ack &= ~PF.REPLY_ACK;
    return ack;
  }

  #initQemu(): void {
    // vhost_user_backend_init
    this.getFeatures();
    if (this.protocolFeaturesOn) {
      this.getProtocolFeatures();
      if ((this.backendProtocolFeatures & PF.CONFIG) === 0n) {
        throw new VhostUserError(
          "qemu: Device expects VHOST_USER_PROTOCOL_F_CONFIG but backend does not support it",
        );
      }
      this.setProtocolFeatures(this.#chooseProtocolFeatures(QEMU_7_2_PROTOCOL_FEATURES));
      if (this.hasProtocolFeature(PF.MQ)) {
        const n = this.getQueueNum();
        if (n < 2) throw new VhostUserError(`qemu: GET_QUEUE_NUM = ${n}, vsock needs 2`);
      }
      if (this.hasProtocolFeature(PF.CONFIGURE_MEM_SLOTS)) {
        const slots = this.getMaxMemSlots();
        if (slots < this.memory.regions.length) {
          throw new VhostUserError(
            `qemu: the back end has ${slots} memory slots, the guest ${this.memory.regions.length} regions`,
          );
        }
      }
    }
    // vhost_dev_init
    this.setOwner();
    this.getFeatures();
    for (let i = 0; i < 2; i++) {
      const masked = eventFd();
      this.#maskedCallFds[i] = masked;
      this.setVringCall(i, masked);
    }
    // vuv_device_realize: vhost_dev_get_config
    if (!this.hasProtocolFeature(PF.CONFIG)) {
      throw new VhostUserError("qemu: vhost-user-vsock needs the CONFIG protocol feature");
    }
    const cfg = this.getConfig(0, VIRTIO_VSOCK_CONFIG_SIZE, 0);
    if (cfg === null) throw new VhostUserError("qemu: GET_CONFIG failed at realize");
    this.configCache = cfg;
  }

  #initCrosvm(): void {
    this.setOwner();
    this.getFeatures();
    if (this.protocolFeaturesOn) {
      this.getProtocolFeatures();
      this.setProtocolFeatures(this.#chooseProtocolFeatures(CROSVM_PROTOCOL_FEATURES));
    }
    if (this.hasProtocolFeature(PF.MQ)) {
      const n = this.getQueueNum();
      if (n < VSOCK_VQ_COUNT) {
        throw new VhostUserError(`crosvm: GET_QUEUE_NUM = ${n}, vsock needs ${VSOCK_VQ_COUNT}`);
      }
    }
  }

  /**
   * The virtio features the VMM offers the guest: the back end's features filtered by the
   * profile (`QEMU_GUEST_FEATURES`, `CROSVM_GUEST_FEATURES`) and by the eventIdx/indirectDesc
   * options.
   */
  deviceFeatures(): bigint {
    let f = this.backendFeatures &
      (this.profile === "qemu" ? QEMU_GUEST_FEATURES : CROSVM_GUEST_FEATURES);
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
    if (this.profile === "qemu") {
      const c = this.configCache;
      if (c === null) throw new VhostUserError("qemu: no config cached (init not run?)");
      if (offset + size > c.length) throw new RangeError(`config read beyond ${c.length} bytes`);
      return c.slice(offset, offset + size);
    }
    const out = new Uint8Array(size);
    for (let off = 0; off < size; off += 4) {
      const n = Math.min(4, size - off);
      const part = this.getConfig(offset + off, n, VHOST_USER_CONFIG_FLAG_WRITABLE);
      if (part === null) {
        throw new VhostUserError(`crosvm: GET_CONFIG [${offset + off}, +${n}) failed`);
      }
      out.set(part, off);
    }
    return out;
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

  /** The features value the VMM sends in SET_FEATURES for the guest's `driverFeatures`. */
  backendFeaturesFor(driverFeatures: bigint): bigint {
    let f = driverFeatures;
    if (this.protocolFeaturesOn) f |= PROTOCOL_FEATURES_MASK;
    return f;
  }

  /**
   * The driver set DRIVER_OK with `driverFeatures` acked and `queues` laid out: run the
   * profile's start sequence for the queues the back end drives. Queues the VMM keeps
   * (qemu's event queue) are only recorded.
   */
  startDevice(driverFeatures: bigint, queues: readonly QueueSetup[], hooks: StartHooks = {}): void {
    this.#checkOpen();
    if (this.#started) throw new Error("startDevice: the device is already started");
    for (const q of queues) {
      if (!isValidQueueSize(q.size) || q.size > this.queueSize) {
        throw new RangeError(`queue ${q.index}: size ${q.size} (the VMM offers ${this.queueSize})`);
      }
    }
    this.#queues = [...queues].sort((a, b) => a.index - b.index);
    const ev = this.#queues.find((q) => q.index === VSOCK_VQ_EVENT);
    this.#eventLastAvail = ev?.base ?? 0;
    if (this.profile === "qemu") this.#startQemu(driverFeatures, hooks);
    else this.#startCrosvm(driverFeatures, hooks);
    this.#started = true;
  }

  #backendQueues(): QueueSetup[] {
    return this.#queues.filter((q) => this.ownsQueue(q.index));
  }

  #startQemu(driverFeatures: bigint, hooks: StartHooks): void {
    const statusOn = this.hasProtocolFeature(PF.STATUS);
    // vhost_dev_set_features -> vhost_user_set_features
    const features = this.backendFeaturesFor(driverFeatures);
    const logging = (features & LOG_ALL_MASK) !== 0n;
    this.setFeatures(features, { needReply: logging });
    if (logging) this.#qemuBarrier();
    if (statusOn) this.#qemuAddStatus(VIRTIO_CONFIG_S_FEATURES_OK);
    // vhost_user_set_mem_table
    this.#qemuMemTable();
    // vhost_virtqueue_start
    for (const q of this.#backendQueues()) {
      this.setVringNum(q.index, q.size);
      this.setVringBase(q.index, q.base);
      this.setVringAddr(q.index, q, { log: logging });
      this.setVringKick(q.index);
    }
    hooks.beforeEnable?.();
    if (this.protocolFeaturesOn) {
      for (const q of this.#backendQueues()) this.setVringEnable(q.index, true);
    }
    if (statusOn) {
      this.#qemuAddStatus(
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
      );
    }
    // vhost_vsock_common_start: vhost_virtqueue_mask(false) per queue
    for (const q of this.#backendQueues()) this.#qemuUnmask(q.index);
  }

  /** QEMU's vhost_user_add_status: GET_STATUS, then SET_STATUS |bits unless already set. */
  #qemuAddStatus(bits: number): void {
    const s = this.getStatus();
    if ((s & bits) === bits) return;
    this.#qemuSetStatus(s | bits);
  }

  /** QEMU's vhost_user_set_status: SET_STATUS with wait_for_reply. */
  #qemuSetStatus(status: number): void {
    const replyAck = this.hasProtocolFeature(PF.REPLY_ACK);
    this.setStatus(status, { needReply: replyAck });
    this.#qemuBarrier();
  }

  #qemuMemTable(): void {
    const replyAck = this.hasProtocolFeature(PF.REPLY_ACK);
    if (this.hasProtocolFeature(PF.CONFIGURE_MEM_SLOTS)) {
      // vhost_user_add_remove_regions: diff against what the back end has.
      const want = new Set(this.memory.regions);
      for (const r of [...this.#announced]) {
        if (!want.has(r)) this.remMemReg(r, { needReply: replyAck });
      }
      for (const r of this.memory.regions) {
        if (!this.#announced.has(r)) this.addMemReg(r, { needReply: replyAck });
      }
    } else {
      this.setMemTable(this.memory.regions, { needReply: replyAck });
    }
  }

  #qemuUnmask(index: number): void {
    this.setVringCall(index);
    // virtio-pci checks the masked notifier for interrupts raised while masked.
    const masked = this.#maskedCallFds[index];
    if (masked !== undefined && eventFdRead(masked) !== 0n) eventFdWrite(this.callFds[index]);
  }

  #startCrosvm(driverFeatures: bigint, hooks: StartHooks): void {
    const features = this.backendFeaturesFor(driverFeatures);
    if (this.ackedFeatures !== features) this.setFeatures(features);
    this.setMemTable();
    const qs = this.#backendQueues();
    for (const q of qs) {
      this.setVringNum(q.index, q.size);
      this.setVringAddr(q.index, q);
      this.setVringBase(q.index, q.base);
      this.setVringCall(q.index);
      this.setVringKick(q.index);
      if (hooks.beforeEnable === undefined && this.protocolFeaturesOn) {
        this.setVringEnable(q.index, true);
      }
    }
    if (hooks.beforeEnable !== undefined) {
      hooks.beforeEnable();
      if (this.protocolFeaturesOn) { for (const q of qs) this.setVringEnable(q.index, true); }
    }
  }

  /**
   * The device stops (driver reset, VM stop, crosvm sleep): the profile's stop sequence.
   * Returns the bases from GET_VRING_BASE, indexed by queue (VMM-owned queues report the
   * VMM's own next avail index).
   */
  stopDevice(): number[] {
    this.#checkOpen();
    if (!this.#started) throw new Error("stopDevice: the device is not started");
    const qs = this.#backendQueues();
    const bases: number[] = [];
    if (this.profile === "qemu") {
      if (this.hasProtocolFeature(PF.STATUS)) this.#qemuSetStatus(0);
      if (this.protocolFeaturesOn) { for (const q of qs) this.setVringEnable(q.index, false); }
      for (const q of qs) bases[q.index] = this.getVringBase(q.index);
    } else {
      for (const q of qs) {
        if (this.protocolFeaturesOn) this.setVringEnable(q.index, false);
        bases[q.index] = this.getVringBase(q.index);
      }
    }
    for (const q of this.#queues) {
      if (!this.ownsQueue(q.index)) bases[q.index] = this.#eventLastAvail;
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
    this.#checkOpen();
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
    this.#checkOpen();
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
    const m = this.memory;
    const availIdx = readU16(m, q.availGpa + VRING_AVAIL_IDX);
    if (availIdx === this.#eventLastAvail) {
      throw new VhostUserError("injectEvent: the guest posted no event buffer (event missed)");
    }
    const slot = this.#eventLastAvail & (q.size - 1);
    const head = readU16(m, q.availGpa + availElemOffset(slot));
    if (head >= q.size) throw new VhostUserError(`injectEvent: bad head ${head}`);
    const d = q.descGpa + head * VRING_DESC_SIZE;
    const dv = new DataView(m.read(d, VRING_DESC_SIZE).buffer);
    const addr = dv.getUint32(0, true) + dv.getUint32(4, true) * 2 ** 32;
    const len = dv.getUint32(8, true);
    const flags = dv.getUint16(12, true);
    if (len < VIRTIO_VSOCK_EVENT_SIZE || (flags & VRING_DESC_F_WRITE) === 0) {
      throw new VhostUserError(`injectEvent: event buffer ${head} is not a writable 4-byte buffer`);
    }
    const ev = new Uint8Array(VIRTIO_VSOCK_EVENT_SIZE);
    new DataView(ev.buffer).setUint32(0, id, true);
    m.write(addr, ev);
    const usedIdx = readU16(m, q.usedGpa + VRING_USED_IDX);
    const e = new Uint8Array(8);
    const ev2 = new DataView(e.buffer);
    ev2.setUint32(0, head, true);
    ev2.setUint32(4, VIRTIO_VSOCK_EVENT_SIZE, true);
    m.write(q.usedGpa + usedElemOffset(usedIdx & (q.size - 1)), e);
    const idx = new Uint8Array(2);
    new DataView(idx.buffer).setUint16(0, (usedIdx + 1) & 0xffff, true);
    m.write(q.usedGpa + VRING_USED_IDX, idx);
    this.#eventLastAvail = (this.#eventLastAvail + 1) & 0xffff;
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
    this.#dirtyLog?.close();
    this.#dirtyLog = null;
  }

  /**
   * Disconnects: closes the socket and this front end's eventfds, and the guest RAM if this
   * front end owns it (it created it) unless `keepMemory`. Idempotent. Reconnect with a new
   * front end given the same `memory`.
   */
  close(opts: { keepMemory?: boolean } = {}): void {
    if (this.#closed) return;
    this.#closed = true;
    close(this.#sock);
    this.#sock = -1;
    for (const fd of [...this.kickFds, ...this.callFds, ...this.#maskedCallFds]) close(fd);
    this.#dirtyLog?.close();
    this.#dirtyLog = null;
    this.#started = false;
    if (this.#ownsMemory && !opts.keepMemory) this.memory.close();
  }

  #checkOpen(): void {
    if (this.#closed) throw new VhostUserError("the front end is closed");
  }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

function readU16(m: GuestRam, gpa: number): number {
  const b = m.bytesAt(gpa, 2);
  return b[0] | (b[1] << 8);
}

function makeDirtyLog(m: Mapping, fd: number, size: number): DirtyLog {
  const bytes = m.bytes.subarray(0, size);
  let closed = false;
  const isDirty = (gpa: number) => {
    const page = Math.floor(gpa / VHOST_LOG_PAGE);
    const byte = page >> 3;
    return byte < bytes.length && (bytes[byte] & (1 << (page & 7))) !== 0;
  };
  return {
    bytes,
    isDirty,
    isRangeDirty(gpa: number, len: number): boolean {
      for (let p = Math.floor(gpa / VHOST_LOG_PAGE); p * VHOST_LOG_PAGE < gpa + len; p++) {
        if (!isDirty(p * VHOST_LOG_PAGE)) return false;
      }
      return true;
    },
    dirtyPages(): number[] {
      const out: number[] = [];
      for (let i = 0; i < bytes.length; i++) {
        if (bytes[i] === 0) continue;
        for (let b = 0; b < 8; b++) if (bytes[i] & (1 << b)) out.push((i * 8 + b) * VHOST_LOG_PAGE);
      }
      return out;
    },
    clear(): void {
      bytes.fill(0);
    },
    close(): void {
      if (closed) return;
      closed = true;
      unmap(m);
      close(fd);
    },
  };
}

async function readToEof(fd: number, timeoutMs: number, what: string): Promise<Uint8Array> {
  const deadline = Date.now() + timeoutMs;
  const chunks: Uint8Array[] = [];
  let total = 0;
  const buf = new Uint8Array(65536);
  for (;;) {
    const n = readRaw(fd, buf);
    if (n > 0) {
      chunks.push(buf.slice(0, n));
      total += n;
      continue;
    }
    if (n === 0) break;
    if (n !== -EAGAIN) throw new SysError("read", -n, what);
    const left = deadline - Date.now();
    if (left <= 0) throw new VhostUserError(`${what}: no EOF within ${timeoutMs} ms`);
    await pollFdsAsync([fd], [POLLIN], Math.min(left, 100));
  }
  const out = new Uint8Array(total);
  let off = 0;
  for (const c of chunks) {
    out.set(c, off);
    off += c.length;
  }
  return out;
}

async function writeAllFd(
  fd: number,
  data: Uint8Array,
  timeoutMs: number,
  what: string,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let off = 0;
  while (off < data.length) {
    const n = writeRaw(fd, data.subarray(off), data.length - off);
    if (n >= 0) {
      off += n;
      continue;
    }
    if (n !== -EAGAIN) throw new SysError("write", -n, what);
    const left = deadline - Date.now();
    if (left <= 0) throw new VhostUserError(`${what}: could not write within ${timeoutMs} ms`);
    await pollFdsAsync([fd], [POLLOUT], Math.min(left, 100));
  }
}
