/**
 * One guest-side vsock stream or seqpacket socket of the testing guest driver (`VsockGuest`),
 * with the connection rules of Linux's `net/vmw_vsock/virtio_transport_common.c`:
 *
 * - credit (`Credit`): every packet we send carries our `buf_alloc` / `fwd_cnt`; RW payload
 *   never exceeds the peer's free credit (`write` waits for a CREDIT_UPDATE); a peer sending
 *   beyond our credit has the packet dropped and counted in `creditViolations`, as Linux drops
 *   it;
 * - CREDIT_UPDATE after a read when the peer may see less than 64 KiB free
 *   (`buf_alloc - (fwd_cnt - last_fwd_cnt) < VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`) or when the read
 *   emptied the receive queue (Linux's `low_rx_bytes` with SO_RCVLOWAT 1);
 * - SHUTDOWN flags are sticky; a peer that shut down both directions gets an RST once its data
 *   is read (Linux checks at the SHUTDOWN: no unread data -> RST + done);
 * - `close()` sends SHUTDOWN(both) and waits for the peer's RST (or SHUTDOWN(both)), sending
 *   the RST itself after `closeTimeoutMs` (Linux's VSOCK_CLOSE_TIMEOUT is 8 s);
 * - an RST from the peer ends the connection: buffered data stays readable, then `read`
 *   returns null (EOF), like Linux's SOCK_DONE.
 *
 * SEQPACKET (type "seqpacket") adds message boundaries to the same rules
 * (`virtio_transport_seqpacket_enqueue` / `_do_dequeue`):
 * - `sendMessage` refuses a message larger than the peer's buf_alloc (Linux's EMSGSIZE), then
 *   sends it like a stream write (RW packets within the peer's credit and 64 KiB, waiting for
 *   credit in between) with VIRTIO_VSOCK_SEQ_EOM on the packet that carries its last byte, and
 *   VIRTIO_VSOCK_SEQ_EOR there too when the sender asked for MSG_EOR; an empty message sends
 *   nothing (Linux's sendmsg loop never runs);
 * - received RW packets are queued until one with EOM completes a message; `readMessage`
 *   returns one whole message and its EOR, and every dequeued message is answered with a
 *   CREDIT_UPDATE (Linux sends one after each message, not by the stream low-water rule);
 * - `write` / `read` on a seqpacket connection are send() / recv(): one message each, `read`
 *   truncating to `max` and dropping the rest of the message (MSG_TRUNC).
 *
 * The driver owns the packet I/O; a `GuestConn` only keeps per-connection state and talks to
 * the driver through the small `ConnDriver` interface.
 */

import { Credit } from "../vsock/credit.ts";
import { concat } from "./bytes.ts";
import {
  MAX_PKT_PAYLOAD,
  VIRTIO_VSOCK_OP_CREDIT_REQUEST,
  VIRTIO_VSOCK_OP_CREDIT_UPDATE,
  VIRTIO_VSOCK_OP_RST,
  VIRTIO_VSOCK_OP_SHUTDOWN,
  VIRTIO_VSOCK_SEQ_EOM,
  VIRTIO_VSOCK_SEQ_EOR,
  VIRTIO_VSOCK_SHUTDOWN_F_BOTH,
  VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE,
  VIRTIO_VSOCK_SHUTDOWN_F_SEND,
  VIRTIO_VSOCK_TYPE_SEQPACKET,
  VIRTIO_VSOCK_TYPE_STREAM,
} from "../vsock/constants.ts";
import type { GuestSocketType } from "./guest_types.ts";

/** Where a connection is in its life. */
export type GuestConnState = "connecting" | "established" | "closing" | "closed";

/** Why a connection ended. */
export type GuestCloseReason =
  /** the peer sent RST (or SHUTDOWN both) after our close(): a clean close */
  | "closed"
  /** our close() got no RST within the timeout; we sent the RST */
  | "close-timeout"
  /** the peer sent RST while the connection was open */
  | "peer-reset"
  /** the peer shut down both directions and all its data was read; we sent RST */
  | "peer-closed"
  /** we sent RST (`reset()`) */
  | "local-reset"
  /** the peer answered our REQUEST with RST */
  | "refused"
  /** no RESPONSE to our REQUEST in time */
  | "connect-timeout"
  /** a TRANSPORT_RESET event dropped it */
  | "transport-reset"
  /** the guest driver was reset (rmmod/insmod) */
  | "driver-reset"
  /** the peer broke the protocol (e.g. an unexpected op while connecting); we sent RST */
  | "protocol-error";

/** Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE: the credit-update low-water mark. */
export const LINUX_CREDIT_LOW_WATER = MAX_PKT_PAYLOAD;

/** A failed socket operation (write after shutdown, read on a reset connection, ...). */
export class GuestConnError extends Error {
  override name = "GuestConnError";
}

/** Options of the waiting socket calls. */
export interface WaitOptions {
  /** give up after this long (default: the guest's `timeoutMs`) */
  readonly timeoutMs?: number;
}

/** Options of `GuestConn.sendMessage`. */
export interface SendMessageOptions extends WaitOptions {
  /** end of record (send with MSG_EOR): the last packet carries VIRTIO_VSOCK_SEQ_EOR too */
  readonly eor?: boolean;
}

/** One seqpacket message, from `GuestConn.readMessage`. */
export interface GuestMessage {
  readonly data: Uint8Array;
  /** the sender used MSG_EOR (VIRTIO_VSOCK_SEQ_EOR on the last packet) */
  readonly eor: boolean;
}

/** The header `type` of a connection-oriented socket type. */
export function wireType(type: GuestSocketType): number {
  return type === "seqpacket" ? VIRTIO_VSOCK_TYPE_SEQPACKET : VIRTIO_VSOCK_TYPE_STREAM;
}

/** What a connection needs from the driver. */
export interface ConnDriver {
  /** default timeout for waits */
  readonly timeoutMs: number;
  /** default close timeout */
  readonly closeTimeoutMs: number;
  /** queues a control packet (no payload) of this connection */
  sendControl(conn: GuestConn, op: number, flags: number): void;
  /**
   * sends RW packets from bytes[off..] as far as credit and tx buffers allow, `lastFlags` on the
   * packet carrying the last byte of `bytes`; returns bytes sent
   */
  sendData(conn: GuestConn, bytes: Uint8Array, off: number, lastFlags: number): number;
  /** whether `sendData` could make progress now */
  canSendData(conn: GuestConn): boolean;
  /** publishes queued packets and kicks if needed */
  flush(): void;
  /** pumps, then waits (bounded) until `pred` holds */
  waitFor(pred: () => boolean, timeoutMs: number, what: string): Promise<void>;
  /** the connection ended: drop it from the connection table */
  forget(conn: GuestConn): void;
}

/** A guest vsock stream or seqpacket connection: from `VsockGuest.connect` or `accept`. */
export class GuestConn {
  /** our port */
  readonly localPort: number;
  /** the peer's CID (2 = host) */
  readonly peerCid: number;
  /** the peer's port */
  readonly peerPort: number;
  /** credit state of both directions (read it; the connection updates it) */
  readonly credit: Credit;
  /** socket type: every packet of the connection carries its header `type` */
  readonly type: GuestSocketType;

  #state: GuestConnState;
  #closeReason: GuestCloseReason | null = null;
  #peerShutdown = 0;
  #localShutdown = 0;
  #bytesReceived = 0;
  #bytesSent = 0;
  #creditViolations = 0;
  #discard = false;
  readonly #chunks: Uint8Array[] = [];
  #chunkOff = 0;
  /** seqpacket: complete messages not read yet, in order (their bytes are in #chunks) */
  readonly #messages: { len: number; eor: boolean }[] = [];
  /** seqpacket: bytes of the message still being received (no EOM yet) */
  #partialLen = 0;
  #messagesReceived = 0;
  readonly #driver: ConnDriver;

  /** @internal Created by the driver. */
  constructor(
    driver: ConnDriver,
    localPort: number,
    peerCid: number,
    peerPort: number,
    bufAlloc: number,
    state: GuestConnState,
    type: GuestSocketType = "stream",
  ) {
    this.#driver = driver;
    this.localPort = localPort;
    this.peerCid = peerCid;
    this.peerPort = peerPort;
    this.credit = new Credit(bufAlloc);
    this.#state = state;
    this.type = type;
  }

  /** Current state. */
  get state(): GuestConnState {
    return this.#state;
  }
  /** Whether the connection ended (buffered data may still be readable). */
  get closed(): boolean {
    return this.#state === "closed";
  }
  /** Why it ended, or null while it lives. */
  get closeReason(): GuestCloseReason | null {
    return this.#closeReason;
  }
  /** SHUTDOWN flags the peer sent (VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE | _SEND), sticky. */
  get peerShutdown(): number {
    return this.#peerShutdown;
  }
  /** SHUTDOWN flags we sent. */
  get localShutdown(): number {
    return this.#localShutdown;
  }
  /** Payload bytes received and accepted (including ones not read yet). */
  get bytesReceived(): number {
    return this.#bytesReceived;
  }
  /** Payload bytes sent. */
  get bytesSent(): number {
    return this.#bytesSent;
  }
  /** RW packets dropped because the peer exceeded the credit we gave it. */
  get creditViolations(): number {
    return this.#creditViolations;
  }
  /** Payload bytes received and not read yet. */
  get buffered(): number {
    return this.credit.buffered();
  }
  /** seqpacket: complete messages received and not read yet. */
  get messagesBuffered(): number {
    return this.#messages.length;
  }
  /** seqpacket: messages completed (EOM seen), including ones not read yet. */
  get messagesReceived(): number {
    return this.#messagesReceived;
  }
  /** Whether no more data will arrive: peer SHUTDOWN(send), RST, or the connection ended. */
  get eof(): boolean {
    return (this.#peerShutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND) !== 0 || this.#state === "closed" ||
      (this.#localShutdown & VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE) !== 0;
  }

  /** "localPort -> cid:port (state)" for messages. */
  describe(): string {
    const type = this.type === "stream" ? "" : ` ${this.type}`;
    return `${this.localPort} -> ${this.peerCid}:${this.peerPort}${type} (${this.#state}` +
      `${
        this.#closeReason ? `, ${this.#closeReason}` : ""
      }, peer free ${this.credit.peerFree()}, ` +
      `buffered ${this.buffered})`;
  }

  // ---- socket calls ---------------------------------------------------------------------

  /**
   * Sends all of `bytes`, in RW packets of at most 64 KiB that never exceed the peer's
   * credit, waiting for credit and tx buffers as needed. Resolves when every byte is in the
   * tx queue. Throws GuestConnError if the connection cannot send (closed, shut down, peer
   * shut down receiving) and a timeout error if no progress is possible in time.
   */
  async write(bytes: Uint8Array, opts: WaitOptions = {}): Promise<void> {
    if (this.type === "seqpacket") return await this.sendMessage(bytes, opts);
    await this.#send(bytes, 0, opts);
  }

  /**
   * seqpacket: sends `bytes` as one message (see the module doc): refused with
   * GuestConnError when larger than the peer's buf_alloc (EMSGSIZE), else sent in RW packets
   * within the peer's credit and 64 KiB, VIRTIO_VSOCK_SEQ_EOM (and _EOR with `eor`) on the
   * last. Resolves when every byte is in the tx queue.
   */
  async sendMessage(bytes: Uint8Array, opts: SendMessageOptions = {}): Promise<void> {
    if (this.type !== "seqpacket") {
      throw new GuestConnError(`sendMessage on ${this.describe()}: not a seqpacket connection`);
    }
    this.#checkWritable();
    if (bytes.length > this.credit.peerBufAlloc) {
      throw new GuestConnError(
        `message of ${bytes.length} bytes is larger than the peer's buf_alloc ` +
          `${this.credit.peerBufAlloc} on ${this.describe()} (EMSGSIZE)`,
      );
    }
    const last = VIRTIO_VSOCK_SEQ_EOM | (opts.eor ? VIRTIO_VSOCK_SEQ_EOR : 0);
    await this.#send(bytes, last, opts);
  }

  async #send(bytes: Uint8Array, lastFlags: number, opts: WaitOptions): Promise<void> {
    let off = 0;
    const timeoutMs = opts.timeoutMs ?? this.#driver.timeoutMs;
    while (off < bytes.length) {
      this.#checkWritable();
      off += this.#driver.sendData(this, bytes, off, lastFlags);
      this.#driver.flush();
      if (off < bytes.length) {
        await this.#driver.waitFor(
          () => this.#driver.canSendData(this) || !this.#writable(),
          timeoutMs,
          `credit or tx buffers to write ${bytes.length - off} more bytes on ${this.describe()}`,
        );
      }
    }
  }

  /**
   * Reads up to `max` bytes (default: whatever is buffered). Waits for data; returns null at
   * EOF (peer SHUTDOWN(send), RST, our SHUTDOWN(receive), or the end of the connection) once
   * buffered data is consumed. Throws GuestConnError after a TRANSPORT_RESET or driver reset,
   * like Linux's ENOTCONN, and a timeout error when nothing arrives in time.
   */
  async read(max = Infinity, opts: WaitOptions = {}): Promise<Uint8Array | null> {
    if (this.type === "seqpacket") {
      const m = await this.readMessage(opts);
      return m === null || m.data.length <= max ? m?.data ?? null : m.data.subarray(0, max);
    }
    if (this.#discard) throw new GuestConnError("read() on a connection in discard mode");
    if (this.buffered === 0 && !this.eof) {
      await this.#driver.waitFor(
        () => this.buffered > 0 || this.eof,
        opts.timeoutMs ?? this.#driver.timeoutMs,
        `data on ${this.describe()}`,
      );
    }
    if (this.buffered > 0) return this.#take(max);
    this.#checkNotReset();
    return null;
  }

  /**
   * seqpacket: the next whole message (reassembled from its packets) and its EOR flag. Waits
   * for one; returns null at EOF when no complete message is left (a message cut off by the
   * peer's RST or SHUTDOWN is never returned). Sends a CREDIT_UPDATE for every message read,
   * as Linux does. Throws like `read` after a TRANSPORT_RESET or driver reset.
   */
  async readMessage(opts: WaitOptions = {}): Promise<GuestMessage | null> {
    if (this.type !== "seqpacket") {
      throw new GuestConnError(`readMessage on ${this.describe()}: not a seqpacket connection`);
    }
    if (this.#discard) throw new GuestConnError("readMessage() on a connection in discard mode");
    if (this.#messages.length === 0 && !this.eof) {
      await this.#driver.waitFor(
        () => this.#messages.length > 0 || this.eof,
        opts.timeoutMs ?? this.#driver.timeoutMs,
        `a message on ${this.describe()}`,
      );
    }
    const m = this.#messages.shift();
    if (m === undefined) {
      this.#checkNotReset();
      return null;
    }
    const data = this.#gather(m.len).slice();
    this.credit.onForwarded(m.len);
    if (this.#state === "established" || this.#state === "closing") {
      // virtio_transport_seqpacket_do_dequeue: a CREDIT_UPDATE after every message
      this.#driver.sendControl(this, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0);
    }
    this.#afterConsume();
    return { data, eor: m.eor };
  }

  /** Reads exactly `n` bytes; throws GuestConnError if EOF comes first. */
  async readExactly(n: number, opts: WaitOptions = {}): Promise<Uint8Array> {
    const out = new Uint8Array(n);
    let got = 0;
    while (got < n) {
      const chunk = await this.read(n - got, opts);
      if (chunk === null) {
        throw new GuestConnError(`EOF after ${got} of ${n} bytes on ${this.describe()}`);
      }
      out.set(chunk, got);
      got += chunk.length;
    }
    return out;
  }

  /** Reads until EOF and returns everything. */
  async readToEnd(opts: WaitOptions = {}): Promise<Uint8Array> {
    const parts: Uint8Array[] = [];
    for (;;) {
      const chunk = await this.read(Infinity, opts);
      if (chunk === null) break;
      parts.push(chunk);
    }
    return concat(parts);
  }

  /**
   * Switches to discard mode (for benchmarks): received payload is consumed at once (counted
   * in `bytesReceived`, credit returned as a reader keeping up would), never stored.
   */
  discardIncoming(): void {
    this.#discard = true;
    this.#messages.length = 0;
    this.#partialLen = 0;
    if (this.buffered > 0) this.#take(Infinity);
  }

  /**
   * Sends SHUTDOWN with `flags` (VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE / _SEND / _BOTH), like
   * shutdown(2) with SHUT_RD / SHUT_WR / SHUT_RDWR. Flags are sticky.
   */
  shutdown(flags: number): void {
    if ((flags & ~VIRTIO_VSOCK_SHUTDOWN_F_BOTH) !== 0 || flags === 0) {
      throw new RangeError(`shutdown flags ${flags}: use VIRTIO_VSOCK_SHUTDOWN_F_*`);
    }
    if (this.#state !== "established") {
      throw new GuestConnError(`shutdown on ${this.describe()}: not connected`);
    }
    this.#localShutdown |= flags;
    this.#driver.sendControl(this, VIRTIO_VSOCK_OP_SHUTDOWN, this.#localShutdown);
    this.#driver.flush();
  }

  /**
   * Closes like Linux's release: SHUTDOWN(both), then wait for the peer's RST (or its
   * SHUTDOWN(both), answered with RST); after `timeoutMs` (default the guest's
   * closeTimeoutMs, 8 s like Linux) send RST ourselves (`closeReason` "close-timeout").
   * Never rejects on timeout. A connection still connecting is reset.
   */
  async close(opts: WaitOptions = {}): Promise<void> {
    if (this.#state === "closed") return;
    if (this.#state === "connecting") {
      this.reset();
      return;
    }
    if (this.#peerShutdown === VIRTIO_VSOCK_SHUTDOWN_F_BOTH) {
      // The peer already finished (and forgot the connection): end it with our RST now
      // instead of waiting for an RST that will not come.
      this.#driver.sendControl(this, VIRTIO_VSOCK_OP_RST, 0);
      this.#driver.flush();
      this._end("closed");
      return;
    }
    if (this.#state === "established") {
      if (this.#localShutdown !== VIRTIO_VSOCK_SHUTDOWN_F_BOTH) {
        this.#localShutdown = VIRTIO_VSOCK_SHUTDOWN_F_BOTH;
        this.#driver.sendControl(this, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_F_BOTH);
        this.#driver.flush();
      }
      this.#state = "closing";
    }
    const timeoutMs = opts.timeoutMs ?? this.#driver.closeTimeoutMs;
    try {
      await this.#driver.waitFor(
        () => this.closed,
        timeoutMs,
        `RST after close of ${this.describe()}`,
      );
    } catch (e) {
      if (this.closed) return;
      if (!(e instanceof Error && e.name === "GuestTimeoutError")) throw e;
      this.#driver.sendControl(this, VIRTIO_VSOCK_OP_RST, 0);
      this.#driver.flush();
      this._end("close-timeout");
    }
  }

  /** Sends RST and ends the connection at once (`closeReason` "local-reset"). */
  reset(): void {
    if (this.#state === "closed") return;
    this.#driver.sendControl(this, VIRTIO_VSOCK_OP_RST, 0);
    this.#driver.flush();
    this._end("local-reset");
  }

  /** Sends CREDIT_REQUEST (Linux never does; for tests of the peer's answer). */
  requestCredit(): void {
    this.#checkOpen();
    this.#driver.sendControl(this, VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0);
    this.#driver.flush();
  }

  /** Sends an unsolicited CREDIT_UPDATE. */
  sendCreditUpdate(): void {
    this.#checkOpen();
    this.#driver.sendControl(this, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0);
    this.#driver.flush();
  }

  /** Waits until the connection ended (any reason). */
  async waitClosed(opts: WaitOptions = {}): Promise<void> {
    await this.#driver.waitFor(
      () => this.closed,
      opts.timeoutMs ?? this.#driver.timeoutMs,
      `end of ${this.describe()}`,
    );
  }

  // ---- driver side (called by VsockGuest) -------------------------------------------------

  /** @internal The peer's RESPONSE arrived. */
  _established(): void {
    this.#state = "established";
  }

  /**
   * @internal An RW payload (a view the caller reuses: copied here) with the packet's flags
   * (VIRTIO_VSOCK_SEQ_EOM / _EOR matter on seqpacket connections only).
   */
  _onData(src: Uint8Array, flags = 0): boolean {
    const n = src.length;
    if (this.#state === "closing") return true; // Linux drops data while disconnecting
    if (!this.credit.onReceived(n)) {
      this.#creditViolations++;
      return false;
    }
    this.#bytesReceived += n;
    const eom = this.type === "seqpacket" && (flags & VIRTIO_VSOCK_SEQ_EOM) !== 0;
    if (eom) this.#messagesReceived++;
    if (this.#discard) {
      this.credit.onForwarded(n);
      this.#maybeCreditUpdate();
      return true;
    }
    if (n > 0) this.#chunks.push(src.slice());
    if (this.type === "seqpacket") {
      this.#partialLen += n;
      if (eom) {
        // Linux sets EOR only together with EOM: an EOR alone means nothing.
        this.#messages.push({ len: this.#partialLen, eor: (flags & VIRTIO_VSOCK_SEQ_EOR) !== 0 });
        this.#partialLen = 0;
      }
    }
    return true;
  }

  /** @internal SHUTDOWN from the peer. Returns true when the connection should be RST now. */
  _onShutdown(flags: number): boolean {
    this.#peerShutdown |= flags & VIRTIO_VSOCK_SHUTDOWN_F_BOTH;
    return this.#peerShutdown === VIRTIO_VSOCK_SHUTDOWN_F_BOTH;
  }

  /** @internal The connection ends (no packet is sent here). */
  _end(reason: GuestCloseReason): void {
    if (this.#state === "closed") return;
    this.#state = "closed";
    this.#closeReason = reason;
    this.#driver.forget(this);
  }

  /** @internal Records sent payload. */
  _sent(n: number): void {
    this.#bytesSent += n;
  }

  #take(max: number): Uint8Array {
    const want = Math.min(max, this.buffered);
    const out = this.#gather(want);
    this.credit.onForwarded(want);
    this.#maybeCreditUpdate();
    this.#afterConsume();
    return out;
  }

  /** Takes the next `want` buffered bytes out of #chunks (a view when one chunk holds them). */
  #gather(want: number): Uint8Array {
    let out: Uint8Array;
    const first = this.#chunks[0];
    if (first !== undefined && first.length - this.#chunkOff >= want) {
      out = first.subarray(this.#chunkOff, this.#chunkOff + want);
      this.#chunkOff += want;
      if (this.#chunkOff === first.length) {
        this.#chunks.shift();
        this.#chunkOff = 0;
      }
    } else {
      out = new Uint8Array(want);
      let got = 0;
      while (got < want) {
        const c = this.#chunks[0];
        const n = Math.min(want - got, c.length - this.#chunkOff);
        out.set(c.subarray(this.#chunkOff, this.#chunkOff + n), got);
        got += n;
        this.#chunkOff += n;
        if (this.#chunkOff === c.length) {
          this.#chunks.shift();
          this.#chunkOff = 0;
        }
      }
    }
    return out;
  }

  /** After a read: finish a connection the peer closed both ways; publish replies. */
  #afterConsume(): void {
    if (
      this.#peerShutdown === VIRTIO_VSOCK_SHUTDOWN_F_BOTH && this.buffered === 0 &&
      this.#state !== "closed"
    ) {
      // The peer closed both ways and its data is consumed: finish like Linux would have at
      // the SHUTDOWN had nothing been unread.
      this.#driver.sendControl(this, VIRTIO_VSOCK_OP_RST, 0);
      this._end("peer-closed");
    }
    this.#driver.flush();
  }

  #checkNotReset(): void {
    if (this.#closeReason === "transport-reset" || this.#closeReason === "driver-reset") {
      throw new GuestConnError(`connection ${this.describe()} was reset (ENOTCONN)`);
    }
  }

  /** Linux's rule in virtio_transport_stream_do_dequeue. */
  #maybeCreditUpdate(): void {
    if (this.#state !== "established" && this.#state !== "closing") return;
    const c = this.credit;
    const delta = (c.fwdCnt - c.lastSentFwdCnt) >>> 0;
    if (delta === 0) return;
    const free = c.bufAlloc - delta;
    if (free < LINUX_CREDIT_LOW_WATER || c.buffered() === 0) {
      this.#driver.sendControl(this, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0);
    }
  }

  #writable(): boolean {
    return this.#state === "established" &&
      (this.#localShutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND) === 0 &&
      (this.#peerShutdown & VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE) === 0;
  }

  #checkWritable(): void {
    if (this.#writable()) return;
    if (this.#state !== "established") {
      throw new GuestConnError(`write on ${this.describe()}: not connected`);
    }
    throw new GuestConnError(`write on ${this.describe()}: shut down for sending (EPIPE)`);
  }

  #checkOpen(): void {
    if (this.#state !== "established" && this.#state !== "closing") {
      throw new GuestConnError(`${this.describe()}: not connected`);
    }
  }
}
