/**
 * Guest-side vsock datagram sockets of the testing guest driver (`VsockGuest.bindDgram`), as
 * the 2022 datagram RFC ("virtio/vsock: introduce datagrams") specifies them for
 * `virtio_transport_common.c`:
 *
 * - only with VIRTIO_VSOCK_F_DGRAM (feature bit 3, this back end's `--dgram`) negotiated;
 * - a datagram is one packet: type VIRTIO_VSOCK_TYPE_DGRAM, op RW, `len` the whole datagram
 *   (at most 64 KiB, MAX_PKT_PAYLOAD; larger is refused like EMSGSIZE), src_port / dst_port
 *   the two sockets' ports, no credit (buf_alloc and fwd_cnt 0), no connection state;
 * - receiving: a datagram for a bound port is queued on that socket until `recvFrom`; the
 *   queue is bounded in bytes like Linux's sk_rcvbuf (`sock_queue_rcv_skb` refuses an skb once
 *   the queue holds rcvbuf bytes or more), and a datagram that finds it full is dropped and
 *   counted. A datagram for an unbound port is dropped silently (no RST: nothing to reset).
 *
 * Datagram sockets survive TRANSPORT_RESET and driver resets, like listeners: they hold no
 * state the device knows about.
 */

import type { WaitOptions } from "./guest_conn.ts";
import { GuestConnError } from "./guest_conn.ts";

/** Linux's net.core.rmem_default: the default sk_rcvbuf of a socket. */
export const LINUX_RMEM_DEFAULT = 212992;

/** One received datagram (`GuestDgramSocket.recvFrom`). */
export interface GuestDatagram {
  /** the sender's CID (2 = host) */
  readonly cid: number;
  /** the sender's port */
  readonly port: number;
  readonly data: Uint8Array;
}

/** Options of `VsockGuest.bindDgram`. */
export interface BindDgramOptions {
  /** receive queue bound in payload bytes (default: the guest's `dgramRcvBuf`) */
  readonly rcvBuf?: number;
}

/** What a datagram socket needs from the driver. */
export interface DgramDriver {
  readonly timeoutMs: number;
  /** puts one DGRAM packet on the tx ring; false when no tx buffer is free now */
  sendDatagram(sock: GuestDgramSocket, cid: number, port: number, bytes: Uint8Array): boolean;
  /** whether a datagram of `len` bytes could be placed now */
  canSendDatagram(len: number): boolean;
  /** largest datagram payload */
  readonly maxDatagram: number;
  /** publishes queued packets and kicks if needed */
  flush(): void;
  /** pumps, then waits (bounded) until `pred` holds */
  waitFor(pred: () => boolean, timeoutMs: number, what: string): Promise<void>;
  /** the socket was closed: unbind its port */
  unbind(sock: GuestDgramSocket): void;
}

/** A bound guest datagram socket. */
export class GuestDgramSocket {
  readonly #queue: GuestDatagram[] = [];
  #queuedBytes = 0;
  #drops = 0;
  #received = 0;
  #sent = 0;
  #closed = false;
  readonly #driver: DgramDriver;

  /** @internal Created by `VsockGuest.bindDgram`. */
  constructor(
    driver: DgramDriver,
    /** the bound port */
    readonly port: number,
    /** receive queue bound in bytes */
    readonly rcvBuf: number,
  ) {
    this.#driver = driver;
  }

  /** Datagrams queued and not read yet. */
  get pending(): number {
    return this.#queue.length;
  }
  /** Payload bytes queued and not read yet. */
  get queuedBytes(): number {
    return this.#queuedBytes;
  }
  /** Datagrams dropped because the receive queue was full. */
  get drops(): number {
    return this.#drops;
  }
  /** Datagrams queued (read or not). */
  get received(): number {
    return this.#received;
  }
  /** Datagrams put on the tx ring. */
  get sent(): number {
    return this.#sent;
  }
  /** Whether `close()` was called. */
  get closed(): boolean {
    return this.#closed;
  }

  /**
   * Sends `bytes` as one datagram to `cid:port`, waiting for a free tx buffer if needed.
   * Throws GuestConnError when closed or when `bytes` exceeds one packet (EMSGSIZE).
   */
  async sendTo(cid: number, port: number, bytes: Uint8Array, opts: WaitOptions = {}) {
    this.#checkOpen();
    checkU32("cid", cid);
    checkU32("port", port);
    if (bytes.length > this.#driver.maxDatagram) {
      throw new GuestConnError(
        `datagram of ${bytes.length} bytes > ${this.#driver.maxDatagram} (EMSGSIZE)`,
      );
    }
    while (!this.#driver.sendDatagram(this, cid, port, bytes)) {
      await this.#driver.waitFor(
        () => this.#closed || this.#driver.canSendDatagram(bytes.length),
        opts.timeoutMs ?? this.#driver.timeoutMs,
        `a tx buffer for a ${bytes.length}-byte datagram from port ${this.port}`,
      );
      this.#checkOpen();
    }
    this.#sent++;
    this.#driver.flush();
  }

  /** The next datagram, waiting for one. Throws GuestConnError once the socket is closed. */
  async recvFrom(opts: WaitOptions = {}): Promise<GuestDatagram> {
    if (this.#queue.length === 0) {
      this.#checkOpen();
      await this.#driver.waitFor(
        () => this.#queue.length > 0 || this.#closed,
        opts.timeoutMs ?? this.#driver.timeoutMs,
        `a datagram on guest port ${this.port}`,
      );
    }
    const d = this.#queue.shift();
    if (d === undefined) throw new GuestConnError(`datagram socket ${this.port} is closed`);
    this.#queuedBytes -= d.data.length;
    return d;
  }

  /** Unbinds the port; queued datagrams are dropped. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#queue.length = 0;
    this.#queuedBytes = 0;
    this.#driver.unbind(this);
  }

  /** @internal A datagram arrived (a view the caller reuses: copied). False when dropped. */
  _deliver(cid: number, port: number, payload: Uint8Array): boolean {
    if (this.#queuedBytes >= this.rcvBuf) {
      this.#drops++;
      return false;
    }
    this.#queue.push({ cid, port, data: payload.slice() });
    this.#queuedBytes += payload.length;
    this.#received++;
    return true;
  }

  #checkOpen(): void {
    if (this.#closed) throw new GuestConnError(`datagram socket ${this.port} is closed`);
  }
}

/** Throws RangeError unless `n` is a u32 (ports and CIDs on the wire). */
export function checkU32(what: string, n: number): void {
  if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) {
    throw new RangeError(`${what} ${n} is not a u32`);
  }
}
