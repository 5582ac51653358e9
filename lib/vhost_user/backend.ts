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
 * SET_VRING_ENABLE that precedes it (seed 003), and a ring that becomes active
 * is always processed at once, so work queued before it started is not stranded
 * (seed 000).
 *
 * Replies: GET_* requests always reply. With REPLY_ACK negotiated, any other
 * request carrying NEED_REPLY gets a u64 ack (0 = success). A malformed
 * message is answered with a failed ack when one is expected and logged; a
 * message that breaks framing closes the connection. When the front end goes
 * away the device is reset and the next front end is accepted on the same
 * socket.
 */
import {
  acceptRaw,
  close,
  EAGAIN,
  EPOLLET,
  EPOLLIN,
  getSockOptInt,
  listenUnix,
  mapShared,
  sendWithFds,
  setNonBlocking,
  SO_ACCEPTCONN,
} from "../../ffi/mod.ts";
import { log } from "../log.ts";
import type { Reactor } from "../reactor.ts";
import { QueueError, SplitQueue } from "../virtio/split_queue.ts";
import {
  VIRTIO_F_NOTIFY_ON_EMPTY_MASK,
  VIRTIO_RING_F_EVENT_IDX_MASK,
  VIRTIO_RING_F_INDIRECT_DESC_MASK,
} from "../virtio/features.ts";
import type { VirtioDevice } from "./device.ts";
import { checkBacked, MappedGuestMemory } from "./guest_memory.ts";
import { MessageReader, type RawMessage } from "./message_reader.ts";
import {
  CodecError,
  decodePayload,
  encodeConfigReply,
  encodeU64Reply,
  encodeVringStateReply,
  type Payload,
} from "./messages.ts";
import {
  DATA_REPLY_REQUESTS,
  requestName,
  VHOST_F_LOG_ALL_MASK as LOG_ALL_MASK,
  VHOST_USER_DEVICE_STATE_NOFD_MASK,
  VHOST_USER_F_PROTOCOL_FEATURES_MASK as PROTOCOL_FEATURES_MASK,
  VHOST_USER_MAX_RAM_SLOTS,
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

/** Something went wrong handling one request: logged, acked as failure. */
class RequestError extends Error {}

export class VhostUserBackend {
  readonly memory: MappedGuestMemory = new MappedGuestMemory();
  readonly vrings: Vring[];
  #listenFd = -1;
  #connFd = -1;
  #reader: MessageReader | null = null;
  #ackedFeatures = 0n;
  #ackedProtocol = 0n;
  #featuresSet = false;
  #status = 0;
  #owner = false;
  #driverResetSuspected = false;
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
    device.attach(reactor);
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
    this.reactor.addFd(this.#listenFd, EPOLLIN, () => this.#accept());
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
      this.reactor.removeFd(this.#listenFd);
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

  #accept(): void {
    for (;;) {
      const fd = acceptRaw(this.#listenFd);
      if (fd === -EAGAIN) return;
      if (fd < 0) {
        log.warn(`vhost-user: accept failed: errno ${-fd}`);
        return;
      }
      if (this.#connFd >= 0) {
        log.warn("vhost-user: a second front end tried to connect while one is attached; refused");
        close(fd);
        continue;
      }
      this.#adopt(fd);
    }
  }

  #adopt(fd: number): void {
    this.#connFd = fd;
    this.connections++;
    this.#reader = new MessageReader(fd);
    this.reactor.addFd(fd, EPOLLIN, () => this.#readMessages());
    log.info(`vhost-user: front end connected (${this.device.name})`);
  }

  #readMessages(): void {
    const reader = this.#reader;
    // Handle a bounded batch, then let other fds run; epoll is level-triggered.
    for (let i = 0; i < 64 && reader !== null && this.#reader === reader; i++) {
      const r = reader.next();
      if (r.kind === "again") return;
      if (r.kind === "eof") return this.#disconnect("front end closed the connection");
      if (r.kind === "error") return this.#disconnect(`protocol error: ${r.reason}`);
      this.#dispatch(r.message);
    }
  }

  #disconnect(why: string): void {
    log.info(`vhost-user: ${why}; resetting the device and waiting for the next front end`);
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
    this.#connFd = -1;
    this.#ackedFeatures = 0n;
    this.#ackedProtocol = 0n;
    this.#featuresSet = false;
    this.#status = 0;
    this.#owner = false;
    this.#driverResetSuspected = false;
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

  #send(bytes: Uint8Array, fds: number[] = []): void {
    if (this.#connFd < 0) return;
    const n = sendWithFds(this.#connFd, bytes, fds);
    if (n !== bytes.byteLength) {
      log.warn(`vhost-user: reply could not be sent (${n < 0 ? `errno ${-n}` : "short write"})`);
    }
  }

  #replyU64(request: number, value: bigint | number): void {
    this.#send(encodeU64Reply(request, value));
  }

  get #replyAck(): boolean {
    return (this.#ackedProtocol & PF.REPLY_ACK) !== 0n;
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
      replied = this.#handle(msg, decoded);
    } catch (e) {
      ok = false;
      const text = e instanceof Error ? e.message : String(e);
      log.warn(`vhost-user: ${name} failed: ${text}`);
      if (!(e instanceof RequestError || e instanceof QueueError || e instanceof CodecError)) {
        log.debug(`vhost-user: ${e instanceof Error ? e.stack : ""}`);
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
        if ((this.#ackedProtocol & PF.LOG_SHMFD) === 0n) return false;
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

  /** Handles one decoded request; returns true if it sent its own reply. */
  #handle(msg: RawMessage, p: Payload): boolean {
    switch (msg.request) {
      case R.GET_FEATURES:
        this.#replyU64(msg.request, this.offeredFeatures);
        return true;
      case R.SET_FEATURES:
        this.#setFeatures(u64(p));
        return false;
      case R.GET_PROTOCOL_FEATURES:
        this.#replyU64(msg.request, this.offeredProtocolFeatures);
        return true;
      case R.SET_PROTOCOL_FEATURES: {
        const f = u64(p);
        const unknown = f & ~this.offeredProtocolFeatures;
        if (unknown !== 0n) {
          log.warn(
            `vhost-user: front end acked protocol features we did not offer: 0x${
              unknown.toString(16)
            }`,
          );
        }
        this.#ackedProtocol = f & this.offeredProtocolFeatures;
        return false;
      }
      case R.SET_OWNER:
        this.#owner = true;
        return false;
      case R.RESET_OWNER:
      case R.RESET_DEVICE:
        this.#resetDevice(msg.request === R.RESET_OWNER ? "RESET_OWNER" : "RESET_DEVICE");
        return false;
      case R.GET_QUEUE_NUM:
        this.#replyU64(msg.request, this.vrings.length);
        return true;
      case R.GET_MAX_MEM_SLOTS:
        this.#replyU64(msg.request, VHOST_USER_MAX_RAM_SLOTS);
        return true;
      case R.SET_MEM_TABLE:
        this.#setMemTable(msg, p);
        return false;
      case R.ADD_MEM_REG: {
        if (p.kind !== "memRegion") throw new RequestError("bad payload");
        if (this.memory.regions.length >= VHOST_USER_MAX_RAM_SLOTS) {
          throw new RequestError(`more than ${VHOST_USER_MAX_RAM_SLOTS} memory regions`);
        }
        this.memory.add(p.value, this.#takeFd(msg));
        this.#rebuildQueues();
        return false;
      }
      case R.REM_MEM_REG: {
        if (p.kind !== "memRegion") throw new RequestError("bad payload");
        const { guestAddr, size } = p.value;
        // Check first: a rejected request must leave the rings as they were.
        if (!this.memory.regions.some((r) => r.gpa === guestAddr && r.size === size)) {
          throw new RequestError(`no region at guest address 0x${guestAddr.toString(16)}`);
        }
        const inUse = this.vrings.some((v) => v.queue !== null && this.#ringInRegion(v, p.value));
        if (inUse) this.#deactivateAll();
        this.memory.remove(guestAddr, size);
        this.#rebuildQueues();
        return false;
      }
      case R.SET_LOG_BASE: {
        if (p.kind !== "log") throw new RequestError("bad payload");
        const fd = this.#takeFd(msg);
        try {
          checkBacked(fd, p.value.mmapOffset, p.value.mmapSize, "dirty log");
          this.memory.setLog(mapShared(fd, p.value.mmapSize, p.value.mmapOffset));
        } finally {
          close(fd);
        }
        this.memory.setLogging((this.#ackedFeatures & LOG_ALL_MASK) !== 0n);
        log.info(`vhost-user: dirty log installed (${p.value.mmapSize} bytes)`);
        this.#replyU64(msg.request, 0);
        return true;
      }
      case R.SET_LOG_FD:
        // Only signalled with LOG_SHMFD-less logging we do not offer; keep nothing.
        return false;
      case R.SET_VRING_NUM: {
        const { index, num } = vringState(p);
        const v = this.#vring(index);
        if (num === 0 || num > this.device.maxQueueSize || (num & (num - 1)) !== 0) {
          throw new RequestError(
            `vring ${index}: size ${num} is not a power of 2 <= ${this.device.maxQueueSize}`,
          );
        }
        v.num = num;
        return false;
      }
      case R.SET_VRING_ADDR: {
        if (p.kind !== "vringAddr") throw new RequestError("bad payload");
        const a = p.value;
        const v = this.#vring(a.index);
        v.descUser = a.descUser;
        v.availUser = a.availUser;
        v.usedUser = a.usedUser;
        v.addrFlags = a.flags;
        v.logGuestAddr = a.logGuestAddr;
        v.hasAddr = true;
        this.device.queueConfigured?.(v.index);
        if (v.stoppedAddr !== null && v.stoppedAddr !== v.addrKey()) {
          this.#driverResetSuspected = true;
        }
        if (v.started) this.#rebuildQueue(v);
        return false;
      }
      case R.SET_VRING_BASE: {
        const { index, num } = vringState(p);
        const v = this.#vring(index);
        v.base = num & 0xffff;
        if (v.stoppedAt !== null && v.stoppedAt !== v.base) this.#driverResetSuspected = true;
        if (v.queue !== null) v.queue.lastAvail = v.base;
        return false;
      }
      case R.GET_VRING_BASE: {
        const { index } = vringState(p);
        const v = this.#vring(index);
        const base = this.#stopRing(v);
        this.#send(encodeVringStateReply(msg.request, { index, num: base }));
        return true;
      }
      case R.SET_VRING_KICK: {
        if (p.kind !== "vringFd") throw new RequestError("bad payload");
        const v = this.#vring(p.value.index);
        // Take the new fd first: a rejected request must leave the ring as it was.
        const fd = p.value.noFd ? -1 : this.#takeFd(msg);
        if (v.kickFd >= 0) {
          this.reactor.removeFd(v.kickFd);
          close(v.kickFd);
          v.kickFd = -1;
        }
        if (fd >= 0) {
          v.kickFd = fd;
          // Edge-triggered: every write to the eventfd is an edge, so the counter need not be
          // read back (one system call less per kick; it cannot reach 2^64 - 1).
          this.reactor.addFd(fd, EPOLLIN | EPOLLET, () => this.#onKick(v));
        } else {
          log.warn(
            `vhost-user: vring ${v.index}: no kick fd (polling mode); processing on other events only`,
          );
        }
        this.#startRing(v);
        return false;
      }
      case R.SET_VRING_CALL: {
        if (p.kind !== "vringFd") throw new RequestError("bad payload");
        const v = this.#vring(p.value.index);
        v.setCallFd(p.value.noFd ? -1 : this.#takeFd(msg));
        return false;
      }
      case R.SET_VRING_ERR: {
        if (p.kind !== "vringFd") throw new RequestError("bad payload");
        const v = this.#vring(p.value.index);
        v.setErrFd(p.value.noFd ? -1 : this.#takeFd(msg));
        return false;
      }
      case R.SET_VRING_ENABLE: {
        const { index, num } = vringState(p);
        const v = this.#vring(index);
        if ((this.#ackedFeatures & PROTOCOL_FEATURES_MASK) === 0n && this.#featuresSet) {
          log.warn(`vhost-user: SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES acked`);
        }
        v.enabled = num !== 0;
        this.#updateActive(v);
        return false;
      }
      case R.VRING_KICK: {
        const { index } = vringState(p);
        const v = this.#vring(index);
        if (v.active) this.device.queueKicked(v.index);
        else v.pendingKicks++;
        return false;
      }
      case R.GET_CONFIG: {
        if (p.kind !== "config") throw new RequestError("bad payload");
        const data = this.device.readConfig(p.value.offset, p.value.size);
        if (data === null) {
          log.warn(`vhost-user: GET_CONFIG offset=${p.value.offset} size=${p.value.size} refused`);
        }
        this.#send(encodeConfigReply(
          data === null
            ? null
            : { offset: p.value.offset, size: data.length, flags: p.value.flags, payload: data },
        ));
        return true;
      }
      case R.SET_CONFIG:
        throw new RequestError("the vsock config space is read-only");
      case R.SET_STATUS: {
        if (p.kind !== "status") throw new RequestError("bad payload");
        this.#status = p.value;
        return false;
      }
      case R.GET_STATUS:
        this.#replyU64(msg.request, this.#status);
        return true;
      case R.SET_BACKEND_REQ_FD:
        // We never send back-end requests; the fd is closed by #dispatch.
        return false;
      case R.SET_DEVICE_STATE_FD: {
        if (p.kind !== "deviceState") throw new RequestError("bad payload");
        if ((this.#ackedProtocol & PF.DEVICE_STATE) === 0n) {
          throw new RequestError("DEVICE_STATE was not negotiated");
        }
        const r = this.#stateChannel.begin(
          p.value.direction,
          p.value.phase,
          this.#takeFd(msg),
          this.#allStopped(),
        );
        this.#replyU64(msg.request, r);
        return true;
      }
      case R.CHECK_DEVICE_STATE: {
        const r = this.#stateChannel.check();
        this.#replyU64(msg.request, r);
        return true;
      }
      default:
        throw new RequestError(`request ${name(msg.request)} is not supported`);
    }
  }

  #setFeatures(f: bigint): void {
    const unknown = f & ~this.offeredFeatures;
    if (unknown !== 0n) {
      throw new RequestError(
        `front end acked features we did not offer: 0x${unknown.toString(16)}`,
      );
    }
    const eventIdxChanged = ((f ^ this.#ackedFeatures) & VIRTIO_RING_F_EVENT_IDX_MASK) !== 0n;
    this.#ackedFeatures = f;
    this.#featuresSet = true;
    this.memory.setLogging((f & LOG_ALL_MASK) !== 0n);
    if ((f & PROTOCOL_FEATURES_MASK) === 0n) {
      // "If VHOST_USER_F_PROTOCOL_FEATURES has not been negotiated, the ring starts directly
      // in the enabled state."
      for (const v of this.vrings) v.enabled = true;
    }
    this.device.setFeatures(f & ~(PROTOCOL_FEATURES_MASK | LOG_ALL_MASK));
    if (eventIdxChanged) this.#rebuildQueues();
  }

  #setMemTable(msg: RawMessage, p: Payload): void {
    if (p.kind !== "memTable") throw new RequestError("bad payload");
    const regions = p.value.regions;
    if (msg.fds.length !== regions.length) {
      throw new RequestError(`${regions.length} regions but ${msg.fds.length} fds`);
    }
    const wasActive = this.vrings.filter((v) => v.active);
    this.#deactivateAll();
    this.memory.clear();
    for (let i = 0; i < regions.length; i++) this.memory.add(regions[i], this.#takeFd(msg, i));
    log.info(
      `vhost-user: memory table: ${
        regions.map((r) => `[0x${r.guestAddr.toString(16)} +${r.size}]`).join(" ")
      }`,
    );
    this.#rebuildQueues();
    if (wasActive.length) log.debug(`vhost-user: ${wasActive.length} rings re-mapped`);
  }

  #ringInRegion(v: Vring, r: { userAddr: number; size: number }): boolean {
    return [v.descUser, v.availUser, v.usedUser].some((a) =>
      a >= r.userAddr && a < r.userAddr + r.size
    );
  }

  #startRing(v: Vring): void {
    if (this.#driverResetSuspected) {
      // Ring addresses or bases changed across a stop: the driver re-initialized the
      // device (rmmod/insmod, reboot). Its connections are gone; reset ours to match.
      this.#driverResetSuspected = false;
      log.info("vhost-user: rings restarted with new addresses/bases: driver reset");
      this.#deactivateAll();
      this.device.reset("driver-reset");
      for (const r of this.vrings) {
        r.stoppedAt = null;
        r.stoppedAddr = null;
      }
    }
    v.started = true;
    if ((this.#ackedFeatures & PROTOCOL_FEATURES_MASK) === 0n) v.enabled = true;
    this.#rebuildQueue(v);
  }

  /** GET_VRING_BASE: stop the ring; returns the next avail index to process. */
  #stopRing(v: Vring): number {
    this.#deactivate(v);
    v.started = false;
    const base = v.queue !== null ? v.queue.lastAvail : v.base;
    v.base = base;
    v.queue = null;
    if (v.kickFd >= 0) {
      this.reactor.removeFd(v.kickFd);
      close(v.kickFd);
      v.kickFd = -1;
    }
    v.stoppedAt = base;
    v.stoppedAddr = v.addrKey();
    if (this.#allStopped()) log.info("vhost-user: all rings stopped (device suspended)");
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

  /** (Re)creates the ring's SplitQueue from its addresses, then updates activity. */
  #rebuildQueue(v: Vring): void {
    if (!v.started) return;
    const prev = v.queue;
    this.#deactivate(v);
    v.queue = null;
    if (!v.hasAddr || v.num === 0 || this.memory.regions.length === 0) return;
    const f = this.#ackedFeatures;
    const desc = this.memory.vaToGpa(v.descUser, 16 * v.num);
    const avail = this.memory.vaToGpa(v.availUser, 6 + 2 * v.num);
    const used = this.memory.vaToGpa(v.usedUser, 6 + 8 * v.num);
    if (desc === null || avail === null || used === null) {
      log.warn(`vhost-user: vring ${v.index}: ring addresses are not in mapped memory`);
      return;
    }
    try {
      const q = new SplitQueue(v.num, this.memory, desc, avail, used, {
        eventIdx: (f & VIRTIO_RING_F_EVENT_IDX_MASK) !== 0n,
        indirect: (f & VIRTIO_RING_F_INDIRECT_DESC_MASK) !== 0n,
        notifyOnEmpty: (f & VIRTIO_F_NOTIFY_ON_EMPTY_MASK) !== 0n,
      });
      q.lastAvail = prev !== null ? prev.lastAvail : v.base;
      if (prev !== null) q.usedIdx = prev.usedIdx;
      v.queue = q;
    } catch (e) {
      log.warn(`vhost-user: vring ${v.index}: ${e instanceof Error ? e.message : e}`);
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
          `vhost-user: vring ${v.index} active (size ${v.num}, base ${v.queue!.lastAvail})`,
        );
      }
      this.device.queueActive({ index: v.index, queue: v.queue!, notifier: v });
      // Process whatever the driver queued before we were ready: kicks that came
      // early (seed 003) and host work that waited for the ring (seed 000).
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
    log.info(`vhost-user: ${why}: resetting the device`);
    this.#resetRings();
    this.device.reset("reset-device");
    this.#ackedFeatures = 0n;
    this.#featuresSet = false;
    this.#status = 0;
  }

  /** For tests and logs: a snapshot of the protocol state. */
  describe(): Record<string, unknown> {
    return {
      connected: this.connected,
      owner: this.#owner,
      features: this.#ackedFeatures,
      protocolFeatures: this.#ackedProtocol,
      status: this.#status,
      vrings: this.vrings.map((v) => ({
        index: v.index,
        started: v.started,
        enabled: v.enabled,
        active: v.active,
      })),
    };
  }
}

function name(id: number): string {
  return requestName(id);
}

function u64(p: Payload): bigint {
  if (p.kind !== "u64") throw new RequestError("bad payload");
  return p.value;
}

function vringState(p: Payload): { index: number; num: number } {
  if (p.kind !== "vringState") throw new RequestError("bad payload");
  return p.value;
}
