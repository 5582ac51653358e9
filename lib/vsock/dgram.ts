/**
 * Datagrams (type VIRTIO_VSOCK_TYPE_DGRAM = 3): the 2022 vsock datagram RFC's transport,
 * offered with VIRTIO_VSOCK_F_DGRAM (feature bit 3; bit 2 is NO_IMPLIED_STREAM) only when
 * the operator asks (`--dgram`). It is not in the virtio spec.
 *
 * On the wire a datagram is one RW packet: no connection, no credit (buf_alloc and fwd_cnt
 * are 0), `len` the whole datagram (at most MAX_PKT_PAYLOAD). It is never split: one that
 * does not fit the guest's rx buffer is dropped, like one that meets a full queue.
 *
 * Host side: the back end binds one SOCK_DGRAM socket, `<uds_path>.dgram`. Every datagram
 * on the host side starts with a line naming the guest port, `<guest-port>\n`:
 * - guest port S -> host port P: the back end sends `S\n<payload>` from `<uds_path>.dgram`
 *   to `<uds_path>_<P>.dgram`, where a host app bound a SOCK_DGRAM socket;
 * - host -> guest port S: a host app bound at `<uds_path>_<P>.dgram` sends `S\n<payload>`
 *   to `<uds_path>.dgram`; the guest sees a datagram from CID 2 port P. A sender bound
 *   anywhere else cannot be answered and is dropped.
 *
 * Nothing is buffered without a bound: datagrams from the host wait in per-(host port,
 * guest port) flows of the RX scheduler (so a flood from one source cannot starve the
 * connections, see rx_scheduler.ts), each at most DGRAM_QUEUE_PACKETS / DGRAM_QUEUE_BYTES,
 * and at most DGRAM_MAX_FLOWS flows. When a datagram meets a full flow it is dropped and
 * counted, and reading pauses until the guest has taken half of that flow's datagrams
 * (DGRAM_RESUME_PACKETS / DGRAM_RESUME_BYTES): the kernel's queue of the
 * socket then fills and senders see EAGAIN (back-pressure), instead of the back end burning
 * a CPU reading datagrams only to drop them. Toward the host a datagram is sent with
 * MSG_DONTWAIT: a full or absent host socket drops it, so the guest's tx queue is never held
 * up.
 */
import { close, EAGAIN, EPOLLIN, MSG_DONTWAIT, sockaddrUn } from "../../ffi/mod.ts";
import { bindUnixDgram, MessageIo } from "../../ffi/mod.ts";
import { log, LogLimiter } from "../log.ts";
import type { Reactor } from "../reactor.ts";
import type { DescChain } from "../virtio/desc_chain.ts";
import {
  MAX_PKT_PAYLOAD,
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_TYPE_DGRAM,
  VSOCK_HOST_CID,
} from "./constants.ts";
import type { PacketHeader } from "./packet.ts";
import { DatagramRing } from "./dgram_ring.ts";
import type { RxFlow } from "./rx_scheduler.ts";

/** Suffix of the back end's datagram socket (`<uds_path>.dgram`) and of host apps' ones. */
export const DGRAM_SUFFIX = ".dgram";
/** Datagrams one flow may hold for the guest. */
export const DGRAM_QUEUE_PACKETS = 64;
/** Payload bytes one flow may hold for the guest. */
export const DGRAM_QUEUE_BYTES = 256 * 1024;
/** A paused endpoint reads again when a flow is down to this many datagrams ... */
export const DGRAM_RESUME_PACKETS = DGRAM_QUEUE_PACKETS / 2;
/** ... and this many bytes. */
export const DGRAM_RESUME_BYTES = DGRAM_QUEUE_BYTES / 2;
/** Flows (host port, guest port) at once; datagrams of further sources are dropped. */
export const DGRAM_MAX_FLOWS = 256;
/** Drained flows' queues kept for reuse (each holds up to DGRAM_QUEUE_BYTES of storage). */
const DGRAM_SPARE_QUEUES = 4;
/** The queue of a forgotten flow: always empty. */
const NO_DATAGRAMS = new DatagramRing(0, 1);
/** Datagrams read from the host socket per wakeup (then other fds get their turn). */
const DGRAM_READS_PER_WAKEUP = 64;
/** Longest `<port>\n` line. */
const PORT_LINE_MAX = 11;

/** What the datagram endpoint needs from the muxer. */
export interface DgramContext {
  readonly reactor: Reactor;
  readonly guestCid: number;
  readonly header: PacketHeader;
  readonly msgIo: MessageIo;
  /** the driver acked VIRTIO_VSOCK_F_DGRAM: only then may it see a datagram */
  readonly dgramAcked: boolean;
  emit(chain: DescChain): void;
  scheduleFlow(f: RxFlow): void;
  weightOf(guestPort: number): number;
}

/** Counters (logged at debug level, rate-limited). */
export interface DgramStats {
  toGuest: number;
  toHost: number;
  droppedToGuest: number;
  droppedToHost: number;
}

/** Datagrams from one host port to one guest port, waiting for rx buffers. */
class DgramFlow implements RxFlow {
  inRxQueue = false;
  deficit = 0;

  constructor(
    readonly ep: DgramEndpoint,
    readonly hostPort: number,
    readonly guestPort: number,
    readonly weight: number,
    /** its datagrams; NO_DATAGRAMS once forgotten (the storage then serves another flow) */
    public queue: DatagramRing,
  ) {}

  get done(): boolean {
    return this.queue.length === 0;
  }

  hasRxWork(): boolean {
    return this.queue.length > 0;
  }

  canSendInto(_room: number): boolean {
    return this.queue.length > 0; // a datagram too big for this buffer is dropped in fillRx
  }

  fillRx(chain: DescChain): number {
    const q = this.queue;
    const len = q.frontLength;
    const fits = len <= chain.writableLen - VIRTIO_VSOCK_HDR_SIZE;
    if (fits) chain.writeFrom(q.front(), VIRTIO_VSOCK_HDR_SIZE);
    q.shift();
    // Read the host socket again once the flow has drained to half: one pause/resume
    // cycle then carries many datagrams, not one (each cycle costs two epoll_ctl calls and,
    // under a flood, one datagram read only to be dropped).
    if (q.length <= DGRAM_RESUME_PACKETS && q.bytes <= DGRAM_RESUME_BYTES) this.ep.resume();
    if (q.length === 0) this.ep.forget(this);
    if (!fits) {
      this.ep.dropped("toGuest", `a ${len}-byte datagram does not fit the guest's buffer`);
      return -1;
    }
    const h = this.ep.ctx.header;
    h.reset();
    h.srcCid = VSOCK_HOST_CID;
    h.dstCid = this.ep.ctx.guestCid;
    h.srcPort = this.hostPort;
    h.dstPort = this.guestPort;
    h.len = len;
    h.type = VIRTIO_VSOCK_TYPE_DGRAM;
    h.op = VIRTIO_VSOCK_OP_RW;
    this.ep.ctx.emit(chain);
    this.ep.stats.toGuest++;
    return VIRTIO_VSOCK_HDR_SIZE + len;
  }
}

export class DgramEndpoint {
  #fd = -1;
  /** reading the host socket is paused (a full flow, or a driver without the feature) */
  #paused = false;
  /** receives host datagrams (its iovec 0 is #buf, set once); sending uses ctx.msgIo */
  readonly #io = new MessageIo();
  /** `<uds_path>_` and `.dgram`, the parts of a host app's path around its port */
  readonly #hostPrefix: Uint8Array;
  readonly #hostSuffix = new TextEncoder().encode(DGRAM_SUFFIX);
  readonly path: string;
  readonly #flows = new Map<number, DgramFlow>();
  /** storage of flows that drained, for the next ones (so a bursty source allocates once) */
  readonly #spareQueues: DatagramRing[] = [];
  readonly #buf = new Uint8Array(PORT_LINE_MAX + MAX_PKT_PAYLOAD);
  readonly #line = new Uint8Array(PORT_LINE_MAX);
  readonly #addrs = new Map<number, Uint8Array>();
  readonly #dropLog = new LogLimiter("vsock: datagrams dropped", 5, 5000, "info");
  readonly stats: DgramStats = { toGuest: 0, toHost: 0, droppedToGuest: 0, droppedToHost: 0 };

  constructor(readonly ctx: DgramContext, readonly udsPath: string) {
    this.path = `${udsPath}${DGRAM_SUFFIX}`;
    this.#hostPrefix = new TextEncoder().encode(`${udsPath}_`);
    this.#io.setIov(0, this.#buf);
  }

  /** Binds `<uds_path>.dgram` and starts reading host datagrams. */
  listen(): void {
    this.#fd = bindUnixDgram(this.path);
    this.ctx.reactor.addFd(this.#fd, EPOLLIN, () => this.#readHost());
    log.info(`vsock: datagrams through ${this.path} ("<guest-port>\\n<payload>")`);
  }

  /** A guest datagram (header validated, type DGRAM, op RW) for CID 2 port `h.dstPort`. */
  fromGuest(h: PacketHeader, chain: DescChain): void {
    const io = this.ctx.msgIo;
    const line = this.#portLine(h.srcPort);
    io.setIov(0, this.#line, line);
    const n = chain.hostIovecs(chain.mem!, io.iov, VIRTIO_VSOCK_HDR_SIZE, h.len, false, 1);
    if (chain.iovBytes !== h.len) {
      this.dropped("toHost", "a datagram in too many pieces");
      return;
    }
    const r = io.send(this.#fd, 1 + n, MSG_DONTWAIT, this.#hostAddress(h.dstPort));
    if (r < 0) {
      this.dropped("toHost", `host port ${h.dstPort}: errno ${-r}`);
      return;
    }
    this.stats.toHost++;
  }

  /** Reads what host apps sent, into the flows (bounded; see the module doc). */
  #readHost(): void {
    const io = this.#io;
    for (let i = 0; i < DGRAM_READS_PER_WAKEUP && !this.#paused; i++) {
      const n = io.recv(this.#fd, 1, 0, true);
      if (n === -EAGAIN) return;
      if (n < 0) {
        this.dropped("toGuest", `datagram socket ${this.path}: errno ${-n}`);
        return;
      }
      if (!this.ctx.dgramAcked) {
        this.dropped("toGuest", "the driver did not ack VIRTIO_VSOCK_F_DGRAM");
        this.#pause();
        return;
      }
      const hostPort = this.#senderPort(io.senderPathBytes());
      if (hostPort < 0) {
        this.dropped("toGuest", `a datagram from ${io.senderPath() || "an unbound socket"}`);
        continue;
      }
      const nl = this.#buf.subarray(0, Math.min(n, PORT_LINE_MAX)).indexOf(10);
      const guestPort = nl > 0 ? parsePort(this.#buf, 0, nl) : -1;
      if (guestPort < 0) {
        this.dropped("toGuest", `a datagram without a "<guest-port>\\n" line`);
        continue;
      }
      const f = this.#flow(hostPort, guestPort);
      if (f === null || !f.queue.push(this.#buf.subarray(nl + 1, n))) {
        this.dropped("toGuest", `queue full for guest port ${guestPort}`);
        this.#pause(); // until the guest takes a datagram
        return;
      }
      this.ctx.scheduleFlow(f);
    }
  }

  /** P from a sender path `<uds_path>_<P>.dgram`, or -1. Allocates nothing. */
  #senderPort(path: Uint8Array): number {
    const pre = this.#hostPrefix;
    const suf = this.#hostSuffix;
    const end = path.length - suf.length;
    if (end <= pre.length) return -1;
    for (let i = 0; i < pre.length; i++) if (path[i] !== pre[i]) return -1;
    for (let i = 0; i < suf.length; i++) if (path[end + i] !== suf[i]) return -1;
    return parsePort(path, pre.length, end);
  }

  #pause(): void {
    if (this.#paused || this.#fd < 0) return;
    this.#paused = true;
    this.ctx.reactor.modifyFd(this.#fd, 0);
  }

  /** Reads the host socket again (a flow has room, or the driver acked the feature). */
  resume(): void {
    if (!this.#paused || this.#fd < 0) return;
    this.#paused = false;
    this.ctx.reactor.modifyFd(this.#fd, EPOLLIN);
  }

  #flow(hostPort: number, guestPort: number): DgramFlow | null {
    const key = hostPort * 0x1_0000_0000 + guestPort;
    let f = this.#flows.get(key);
    if (f === undefined) {
      if (this.#flows.size >= DGRAM_MAX_FLOWS) return null;
      const queue = this.#spareQueues.pop() ??
        new DatagramRing(DGRAM_QUEUE_BYTES, DGRAM_QUEUE_PACKETS);
      f = new DgramFlow(this, hostPort, guestPort, this.ctx.weightOf(guestPort), queue);
      this.#flows.set(key, f);
    }
    return f;
  }

  /** `f` has nothing queued: forget it (it is recreated by the next datagram). */
  forget(f: DgramFlow): void {
    this.#flows.delete(f.hostPort * 0x1_0000_0000 + f.guestPort);
    // Whoever still holds `f` must never reach the datagrams of the flow that gets this
    // storage next (the scheduler drops a flow as soon as it is done, but that is its rule).
    if (this.#spareQueues.length < DGRAM_SPARE_QUEUES) this.#spareQueues.push(f.queue);
    f.queue = NO_DATAGRAMS;
  }

  /** Counts (and, rate-limited, logs) a dropped datagram. */
  dropped(way: "toGuest" | "toHost", why: string): void {
    if (way === "toGuest") this.stats.droppedToGuest++;
    else this.stats.droppedToHost++;
    if (this.#dropLog.allow()) {
      const s = this.stats;
      log.info(
        `vsock: datagram ${way === "toGuest" ? "to the guest" : "to the host"} dropped: ${why} ` +
          `(dropped ${s.droppedToGuest} to the guest, ${s.droppedToHost} to the host; ` +
          `delivered ${s.toGuest} / ${s.toHost})`,
      );
    }
  }

  #portLine(port: number): number {
    const text = `${port}\n`;
    for (let i = 0; i < text.length; i++) this.#line[i] = text.charCodeAt(i);
    return text.length;
  }

  /** `<uds_path>_<P>.dgram` as a sockaddr (cached for the ports in use, bounded). */
  #hostAddress(port: number): Uint8Array {
    let a = this.#addrs.get(port);
    if (a === undefined) {
      if (this.#addrs.size >= DGRAM_MAX_FLOWS) this.#addrs.clear();
      a = sockaddrUn(`${this.udsPath}_${port}${DGRAM_SUFFIX}`);
      this.#addrs.set(port, a);
    }
    return a;
  }

  /** Forgets every queued datagram (device reset). */
  clear(): void {
    this.#flows.clear();
    this.#spareQueues.length = 0;
  }

  close(): void {
    this.clear();
    if (this.#fd < 0) return;
    this.ctx.reactor.removeFd(this.#fd);
    close(this.#fd);
    this.#fd = -1;
    try {
      Deno.removeSync(this.path);
    } catch { /* gone */ }
  }
}

/** A decimal u32 from the ASCII digits bytes[from, to), or -1. */
function parsePort(bytes: Uint8Array, from: number, to: number): number {
  if (to <= from || to - from > 10) return -1;
  let v = 0;
  for (let i = from; i < to; i++) {
    const d = bytes[i];
    if (d < 48 || d > 57) return -1;
    v = v * 10 + (d - 48);
  }
  return v <= 0xffffffff ? v : -1;
}
