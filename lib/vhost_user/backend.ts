/**
 * The vhost-user back end: one front end (VMM) at a time on a Unix socket.
 *
 * It implements the front-end requests of QEMU's `docs/interop/vhost-user.rst`
 * that a vsock device needs (features, memory table, vring set-up and
 * lifecycle, config space, status, reset, dirty log, device state), and drives
 * a `VirtioDevice` through the small contract in `device.ts`.
 *
 * Everything runs on one reactor: the control socket and the kick eventfds are
 * handled in one program order, so a kick can never overtake the
 * SET_VRING_ENABLE that precedes it ("never drop a kick"), and a ring that
 * becomes active is always processed at once, so work queued before it started
 * is not stranded ("kick after start").
 *
 * Requests are dispatched through a table of handlers grouped by concern
 * (`handlers_negotiation.ts`, `handlers_memory.ts`, `handlers_vring.ts`,
 * `handlers_device.ts`, over the `HandlerContext` of `handler_context.ts`); this
 * module keeps the connection, the replies and the ring lifecycle.
 *
 * Replies: GET_* requests always reply. With REPLY_ACK negotiated, any other
 * request carrying NEED_REPLY gets a u64 ack (0 = success). A malformed
 * message is answered with a failed ack when one is expected and logged; a
 * message that breaks framing closes the connection. A reply that cannot be
 * sent whole (the front end does not read its replies and hundreds are queued,
 * or a short write that would break the framing) ends the connection too, with
 * one log line. When the front end goes away the device is reset and the next
 * front end is accepted on the same socket; a front end that connects while
 * the previous one has hung up but its last messages are still queued gets in
 * once those are handled. Every line a front end can trigger is rate-limited.
 */
import {
  close,
  EPOLLERR,
  EPOLLHUP,
  EPOLLIN,
  getSockOptInt,
  listenUnix,
  POLLERR,
  pollFds,
  POLLHUP,
  POLLIN,
  sendWithFds,
  setNonBlocking,
  SO_ACCEPTCONN,
} from "../../ffi/mod.ts";
import { Acceptor } from "../acceptor.ts";
import { log, LogLimiter } from "../log.ts";
import type { Reactor } from "../reactor.ts";
import { PackedQueue } from "../virtio/packed_queue.ts";
import { PACKED_EVENT_SIZE, packedDescRingSize } from "../virtio/packed_layout.ts";
import { SplitQueue } from "../virtio/split_queue.ts";
import { QueueError, type VirtQueueOptions } from "../virtio/virtqueue.ts";
import {
  VIRTIO_F_NOTIFY_ON_EMPTY_MASK,
  VIRTIO_F_RING_PACKED_MASK,
  VIRTIO_RING_F_EVENT_IDX_MASK,
  VIRTIO_RING_F_INDIRECT_DESC_MASK,
} from "../virtio/features.ts";
import { availRingSize, descTableSize, usedRingSize } from "../virtio/split_layout.ts";
import type { VirtioDevice } from "./device.ts";
import { MappedGuestMemory } from "./guest_memory.ts";
import {
  type BackendSession,
  type Handler,
  type HandlerContext,
  newSession,
  RequestError,
  requestLog,
} from "./handler_context.ts";
import { DEVICE_HANDLERS } from "./handlers_device.ts";
import { MEMORY_HANDLERS } from "./handlers_memory.ts";
import { NEGOTIATION_HANDLERS } from "./handlers_negotiation.ts";
import { VRING_HANDLERS } from "./handlers_vring.ts";
import { MessageReader, type RawMessage } from "./message_reader.ts";
import { CodecError, decodePayload, encodeConfigReply, encodeU64Reply } from "./messages.ts";
import {
  DATA_REPLY_REQUESTS,
  requestName,
  VHOST_F_LOG_ALL_MASK as LOG_ALL_MASK,
  VHOST_USER_DEVICE_STATE_NOFD_MASK,
  VHOST_USER_F_PROTOCOL_FEATURES_MASK as PROTOCOL_FEATURES_MASK,
  VHOST_USER_NEED_REPLY_MASK,
  VhostUserProtocolFeatureMask as PF,
  VhostUserRequest as R,
} from "./protocol.ts";
import { Vring } from "./vring.ts";
import { DeviceStateChannel } from "./device_state.ts";

/** Protocol features the back end itself implements (the device may add more). */
export const BACKEND_PROTOCOL_FEATURES = PF.MQ | PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS |
  PF.RESET_DEVICE | PF.STATUS | PF.LOG_SHMFD;

export interface BackendOptions {
  /** path of the listening socket (created; removed on close) */
  socketPath?: string;
  /** an inherited listening socket (`--fd`) */
  listenFd?: number;
}

/** Messages handled per readiness event of the front-end socket before other fds run. */
const MESSAGES_PER_BATCH = 64;

/** Connects, disconnects and refusals: a front end that reconnects in a loop triggers them. */
const connectionLog = new LogLimiter("vhost-user: front-end connection lines", 20, 5000, "info");

/** Every request the back end handles, by id. */
const HANDLERS: ReadonlyMap<number, Handler> = new Map([
  ...NEGOTIATION_HANDLERS,
  ...MEMORY_HANDLERS,
  ...VRING_HANDLERS,
  ...DEVICE_HANDLERS,
]);

export class VhostUserBackend {
  readonly memory: MappedGuestMemory = new MappedGuestMemory();
  readonly vrings: Vring[];
  #listenFd = -1;
  #acceptor: Acceptor | null = null;
  #connFd = -1;
  #reader: MessageReader | null = null;
  /** why a reply could not be sent whole: the connection ends after the current message */
  /** a reply is being held (CHECK_DEVICE_STATE waiting for a load's EOF) */
  #held = false;
  #replyFailed: string | null = null;
  /** what the current front end negotiated */
  readonly #session: BackendSession = newSession();
  /** the back end as the request handlers see it */
  readonly #ctx: HandlerContext;
  readonly #stateChannel: DeviceStateChannel;
  /** front ends served so far (for logs/tests) */
  connections = 0;

  constructor(
    readonly reactor: Reactor,
    readonly device: VirtioDevice,
    readonly options: BackendOptions,
  ) {
    this.vrings = Array.from({ length: device.maxQueues }, (_, i) => new Vring(i));
    this.#stateChannel = new DeviceStateChannel(reactor, device);
    this.#ctx = this.#handlerContext();
    device.attach(reactor);
  }

  #handlerContext(): HandlerContext {
    const offered = () => this.offeredFeatures;
    const offeredProtocol = () => this.offeredProtocolFeatures;
    return {
      reactor: this.reactor,
      device: this.device,
      memory: this.memory,
      vrings: this.vrings,
      session: this.#session,
      stateChannel: this.#stateChannel,
      get offeredFeatures() {
        return offered();
      },
      get offeredProtocolFeatures() {
        return offeredProtocol();
      },
      send: (bytes, fds) => this.#send(bytes, fds),
      replyU64: (request, value) => this.#replyU64(request, value),
      holdReplies: () => this.#holdReplies(),
      takeFd: (msg, i) => this.#takeFd(msg, i),
      vring: (index) => this.#vring(index),
      startRing: (v) => this.#startRing(v),
      stopRing: (v) => this.#stopRing(v),
      rebuildQueue: (v) => this.#rebuildQueue(v),
      rebuildQueues: () => this.#rebuildQueues(),
      updateActive: (v) => this.#updateActive(v),
      deactivateAll: () => this.#deactivateAll(),
      resetDevice: (why) => this.#resetDevice(why),
      allStopped: () => this.#allStopped(),
      onKick: (v) => this.#onKick(v),
    };
  }

  /** Starts listening. */
  listen(): void {
    if (this.options.listenFd !== undefined) {
      const fd = this.options.listenFd;
      setNonBlocking(fd, true);
      if (getSockOptInt(fd, SO_ACCEPTCONN) === 0) {
        // An already-connected front end (the vhost-user-gpu style of --fd).
        this.#adopt(fd);
        log.info(`vhost-user: ${this.device.name} serving the front end connected on fd ${fd}`);
        return;
      }
      this.#listenFd = fd;
    } else if (this.options.socketPath !== undefined) {
      this.#listenFd = listenUnix(this.options.socketPath, { backlog: 4 });
    } else {
      throw new Error("vhost-user back end needs a socket path or a listening fd");
    }
    this.#acceptor = new Acceptor(
      this.reactor,
      this.#listenFd,
      `vhost-user: ${this.device.name}`,
      (fd) => this.#accepted(fd),
    );
    this.#acceptor.start();
    log.info(
      `vhost-user: ${this.device.name} listening on ${
        this.options.socketPath ?? `fd ${this.#listenFd}`
      }`,
    );
  }

  get connected(): boolean {
    return this.#connFd >= 0;
  }

  /** virtio features offered in GET_FEATURES. */
  get offeredFeatures(): bigint {
    return this.device.features | PROTOCOL_FEATURES_MASK | LOG_ALL_MASK;
  }

  /** protocol features offered in GET_PROTOCOL_FEATURES. */
  get offeredProtocolFeatures(): bigint {
    return BACKEND_PROTOCOL_FEATURES | this.device.protocolFeatures;
  }

  /** Stops listening, drops the front end, resets the device. */
  close(): void {
    if (this.#connFd >= 0) this.#disconnect("back end shutting down");
    if (this.#listenFd >= 0) {
      this.#acceptor?.stop();
      this.#acceptor = null;
      close(this.#listenFd);
      this.#listenFd = -1;
      if (this.options.socketPath !== undefined) {
        try {
          Deno.removeSync(this.options.socketPath);
        } catch { /* already gone */ }
      }
    }
    this.#stateChannel.dispose();
  }

  /** A front end connected (accepts back off on EMFILE: see lib/acceptor.ts). */
  #accepted(fd: number): void {
    if (this.#connFd >= 0 && !this.#finishIfHungUp()) {
      if (connectionLog.allow()) {
        log.warn("vhost-user: a second front end tried to connect while one is attached; refused");
      }
      close(fd);
      return;
    }
    this.#adopt(fd);
  }

  /**
   * A front end connects while one is attached: if the attached one has hung up (its
   * last messages and EOF still queued behind the per-event batch), handle what it sent
   * and let it go. Bounded: a closed peer sends nothing more. True if it is gone now.
   */
  #finishIfHungUp(): boolean {
    const rev = pollFds([this.#connFd], [POLLIN], 0)[0];
    if ((rev & (POLLHUP | POLLERR)) === 0) return false;
    if (!this.#held) this.#serve(Infinity);
    // Its last messages may have started a held reply (CHECK_DEVICE_STATE): nobody reads it.
    if (this.#held) this.#disconnect("front end hung up while its reply was pending");
    return this.#connFd < 0;
  }

  #adopt(fd: number): void {
    this.#connFd = fd;
    this.#replyFailed = null;
    this.connections++;
    this.#reader = new MessageReader(fd);
    // A bounded batch per event, then other fds run; epoll is level-triggered.
    this.reactor.addFd(fd, EPOLLIN, (ev) => {
      // While a reply is held no EPOLLIN is asked for, but a hang-up is still reported.
      if (this.#held && (ev & (EPOLLHUP | EPOLLERR)) !== 0) {
        return this.#disconnect("front end hung up while its reply was pending");
      }
      this.#serve(MESSAGES_PER_BATCH);
    });
    if (connectionLog.allow()) log.info(`vhost-user: front end connected (${this.device.name})`);
  }

  /** Handles up to `limit` messages of the attached front end (fewer if it goes). */
  #serve(limit: number): void {
    const reader = this.#reader;
    for (let i = 0; i < limit && reader !== null && this.#reader === reader && !this.#held; i++) {
      const r = reader.next();
      if (r.kind === "again") return;
      if (r.kind === "eof") return this.#disconnect("front end closed the connection");
      if (r.kind === "error") return this.#disconnect(`protocol error: ${r.reason}`);
      this.#dispatch(r.message);
      if (this.#replyFailed !== null && this.#reader === reader) {
        return this.#disconnect(`a reply could not be sent whole (${this.#replyFailed})`);
      }
    }
  }

  #disconnect(why: string): void {
    if (connectionLog.allow()) {
      log.info(`vhost-user: ${why}; resetting the device and waiting for the next front end`);
    }
    this.#resetRings();
    this.device.reset("front-end-disconnected");
    this.#stateChannel.reset();
    this.memory.clear();
    if (this.#connFd >= 0) {
      this.reactor.removeFd(this.#connFd);
      close(this.#connFd);
    }
    this.#reader?.dispose();
    this.#reader = null;
    this.#held = false;
    this.#connFd = -1;
    this.#replyFailed = null;
    Object.assign(this.#session, newSession());
  }

  /** Stops and forgets every ring, closing its fds. */
  #resetRings(): void {
    for (const v of this.vrings) {
      this.#deactivate(v);
      if (v.kickFd >= 0) this.reactor.removeFd(v.kickFd);
      v.closeFds();
      this.vrings[v.index] = new Vring(v.index);
    }
  }

  /**
   * Sends a reply whole, or marks the connection for ending (`#serve` ends it after the
   * current message): a front end that does not read its replies fills the socket buffer
   * (EAGAIN after hundreds of replies), and a short write would break the framing.
   */
  #send(bytes: Uint8Array, fds: number[] = []): void {
    if (this.#connFd < 0 || this.#replyFailed !== null) return;
    const n = sendWithFds(this.#connFd, bytes, fds);
    if (n !== bytes.byteLength) {
      this.#replyFailed = n < 0
        ? `errno ${-n}`
        : `short write of ${n} of ${bytes.byteLength} bytes`;
    }
  }

  /** See HandlerContext.holdReplies: reading pauses until the deferred reply is sent. */
  #holdReplies(): (reply: Uint8Array) => void {
    const reader = this.#reader;
    const fd = this.#connFd;
    this.#held = true;
    if (fd >= 0) this.reactor.modifyFd(fd, 0); // level-triggered: stop the events too
    return (reply) => {
      if (this.#reader !== reader || reader === null) return; // that front end is gone
      this.#held = false;
      this.#send(reply);
      if (this.#replyFailed !== null) {
        this.#disconnect(`a reply could not be sent whole (${this.#replyFailed})`);
        return;
      }
      this.reactor.modifyFd(fd, EPOLLIN);
    };
  }

  #replyU64(request: number, value: bigint | number): void {
    this.#send(encodeU64Reply(request, value));
  }

  get #replyAck(): boolean {
    return (this.#session.ackedProtocol & PF.REPLY_ACK) !== 0n;
  }

  #dispatch(msg: RawMessage): void {
    const name = requestName(msg.request);
    if (log.traceOn) {
      log.trace(`vhost-user: <- ${name} size=${msg.payload.length} fds=${msg.fds.length}`);
    }
    const decoded = decodePayload(msg.request, msg.payload);
    let ok = true;
    let replied = false;
    try {
      if (decoded instanceof CodecError) throw new RequestError(decoded.message);
      const handler = HANDLERS.get(msg.request);
      if (handler === undefined) {
        throw new RequestError(`request ${requestName(msg.request)} is not supported`);
      }
      replied = handler(this.#ctx, msg, decoded);
    } catch (e) {
      ok = false;
      if (requestLog.allow()) {
        log.warn(`vhost-user: ${name} failed: ${e instanceof Error ? e.message : String(e)}`);
        if (!(e instanceof RequestError || e instanceof QueueError || e instanceof CodecError)) {
          log.debug(`vhost-user: ${e instanceof Error ? e.stack : ""}`);
        }
      }
    } finally {
      for (const fd of msg.fds) close(fd); // handlers take the fds they keep (set to -1)
    }
    if (!replied && !ok) replied = this.#replyFailure(msg.request);
    if (!replied && !ok && DATA_REPLY_REQUESTS.has(msg.request)) {
      // The front end blocks on this reply and nothing can stand for it (an ack would be
      // misread as the data): hang up, so it sees the failure instead of waiting forever.
      this.#disconnect(`${name} failed and its reply cannot be given`);
      return;
    }
    if (!replied && this.#replyAck && (msg.flags & VHOST_USER_NEED_REPLY_MASK) !== 0) {
      this.#replyU64(msg.request, ok ? 0 : 1);
    }
  }

  /**
   * A request whose reply the protocol makes mandatory failed: answer it anyway, with a
   * failure of the reply's own shape, so the front end does not wait forever.
   */
  #replyFailure(request: number): boolean {
    switch (request) {
      case R.SET_DEVICE_STATE_FD:
        this.#replyU64(request, 1 | VHOST_USER_DEVICE_STATE_NOFD_MASK);
        return true;
      case R.CHECK_DEVICE_STATE:
        this.#replyU64(request, 1);
        return true;
      case R.SET_LOG_BASE:
        if ((this.#session.ackedProtocol & PF.LOG_SHMFD) === 0n) return false;
        this.#replyU64(request, 1);
        return true;
      case R.GET_CONFIG:
        this.#send(encodeConfigReply(null));
        return true;
      default:
        return false;
    }
  }

  /** Takes fd #i of the message (the caller owns it now). */
  #takeFd(msg: RawMessage, i = 0): number {
    if (i >= msg.fds.length) throw new RequestError("missing file descriptor");
    const fd = msg.fds[i];
    msg.fds[i] = -1;
    return fd;
  }

  #vring(index: number): Vring {
    if (!Number.isInteger(index) || index < 0 || index >= this.vrings.length) {
      throw new RequestError(
        `vring index ${index} out of range (device has ${this.vrings.length})`,
      );
    }
    return this.vrings[index];
  }

  #startRing(v: Vring): void {
    if (this.#session.driverResetSuspected) {
      // Ring addresses or bases changed across a stop: the driver re-initialized the
      // device (rmmod/insmod, reboot). Its connections are gone; reset ours to match.
      this.#session.driverResetSuspected = false;
      if (requestLog.allow()) {
        log.info("vhost-user: rings restarted with new addresses/bases: driver reset");
      }
      this.#deactivateAll();
      this.device.reset("driver-reset");
      for (const r of this.vrings) {
        r.stoppedAt = null;
        r.stoppedAddr = null;
      }
    }
    v.started = true;
    if ((this.#session.ackedFeatures & PROTOCOL_FEATURES_MASK) === 0n) v.enabled = true;
    this.#rebuildQueue(v);
  }

  /** GET_VRING_BASE: stop the ring; returns its position (`VirtQueue.ringBase`). */
  #stopRing(v: Vring): number {
    this.#deactivate(v);
    v.started = false;
    const base = v.queue !== null ? v.queue.ringBase : v.base;
    v.base = base;
    v.queue = null;
    if (v.kickFd >= 0) {
      this.reactor.removeFd(v.kickFd);
      close(v.kickFd);
      v.kickFd = -1;
    }
    v.stoppedAt = base;
    v.stoppedAddr = v.addrKey();
    if (this.#allStopped() && requestLog.allow()) {
      log.info("vhost-user: all rings stopped (device suspended)");
    }
    return base;
  }

  #allStopped(): boolean {
    return this.vrings.every((r) => !r.started);
  }

  #onKick(v: Vring): void {
    if (v.active) this.device.queueKicked(v.index);
    else {
      v.pendingKicks++;
      if (log.debugOn) log.debug(`vhost-user: vring ${v.index} kicked while inactive; remembered`);
    }
  }

  /** (Re)creates the ring's queue from its addresses, then updates activity. */
  #rebuildQueue(v: Vring): void {
    if (!v.started) return;
    const prev = v.queue;
    this.#deactivate(v);
    v.queue = null;
    if (!v.hasAddr || v.num === 0 || this.memory.regions.length === 0) return;
    const f = this.#session.ackedFeatures;
    const packed = (f & VIRTIO_F_RING_PACKED_MASK) !== 0n;
    // Packed: descriptor ring, driver area ("avail"), device area ("used"). Split: the
    // sizes with the EVENT_IDX fields, whether negotiated or not.
    const desc = this.memory.vaToGpa(
      v.descUser,
      packed ? packedDescRingSize(v.num) : descTableSize(v.num),
    );
    const avail = this.memory.vaToGpa(
      v.availUser,
      packed ? PACKED_EVENT_SIZE : availRingSize(v.num, true),
    );
    const used = this.memory.vaToGpa(
      v.usedUser,
      packed ? PACKED_EVENT_SIZE : usedRingSize(v.num, true),
    );
    if (desc === null || avail === null || used === null) {
      if (requestLog.allow()) {
        log.warn(`vhost-user: vring ${v.index}: ring addresses are not in mapped memory`);
      }
      return;
    }
    try {
      const opts: VirtQueueOptions = {
        eventIdx: (f & VIRTIO_RING_F_EVENT_IDX_MASK) !== 0n,
        indirect: (f & VIRTIO_RING_F_INDIRECT_DESC_MASK) !== 0n,
        notifyOnEmpty: (f & VIRTIO_F_NOTIFY_ON_EMPTY_MASK) !== 0n,
      };
      const q = packed
        ? new PackedQueue(v.num, this.memory, desc, avail, used, opts)
        : new SplitQueue(v.num, this.memory, desc, avail, used, opts);
      // A rebuilt ring (new memory table) goes on where it was; a packed ring's base holds
      // both of its positions.
      q.ringBase = prev !== null && prev.packed === packed ? prev.ringBase : v.base;
      // Pushed used entries survive a rebuild (the ring's memory is the same guest RAM).
      if (prev instanceof SplitQueue && q instanceof SplitQueue) q.usedIdx = prev.usedIdx;
      v.queue = q;
    } catch (e) {
      if (requestLog.allow()) {
        log.warn(`vhost-user: vring ${v.index}: ${e instanceof Error ? e.message : e}`);
      }
      return;
    }
    this.#updateActive(v);
  }

  #rebuildQueues(): void {
    for (const v of this.vrings) if (v.started) this.#rebuildQueue(v);
  }

  #updateActive(v: Vring): void {
    const want = v.started && v.enabled && v.queue !== null;
    if (want && !v.active) {
      v.active = true;
      if (log.debugOn) {
        log.debug(
          `vhost-user: vring ${v.index} active (size ${v.num}, base ${v.queue!.ringBase})`,
        );
      }
      this.device.queueActive({ index: v.index, queue: v.queue!, notifier: v });
      // Process whatever the driver queued before we were ready: kicks that came
      // early ("never drop a kick") and host work that waited for the ring ("kick after
      // start").
      v.pendingKicks = 0;
      this.device.queueKicked(v.index);
    } else if (!want && v.active) {
      this.#deactivate(v);
    }
  }

  #deactivate(v: Vring): void {
    if (!v.active) return;
    v.active = false;
    this.device.queueInactive(v.index);
  }

  #deactivateAll(): void {
    for (const v of this.vrings) this.#deactivate(v);
  }

  #resetDevice(why: string): void {
    if (requestLog.allow()) log.info(`vhost-user: ${why}: resetting the device`);
    this.#resetRings();
    this.device.reset("reset-device");
    this.#session.ackedFeatures = 0n;
    this.#session.featuresSet = false;
    this.#session.status = 0;
  }

  /** For tests and logs: a snapshot of the protocol state. */
  describe(): Record<string, unknown> {
    return {
      connected: this.connected,
      owner: this.#session.owner,
      features: this.#session.ackedFeatures,
      protocolFeatures: this.#session.ackedProtocol,
      status: this.#session.status,
      vrings: this.vrings.map((v) => ({
        index: v.index,
        started: v.started,
        enabled: v.enabled,
        active: v.active,
      })),
    };
  }
}
