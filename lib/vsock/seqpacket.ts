/**
 * SEQPACKET message boundaries (virtio 1.3 "Socket Device": VIRTIO_VSOCK_SEQ_EOM marks the
 * last packet of a message, VIRTIO_VSOCK_SEQ_EOR a record end) on a hybrid connection whose
 * host side is a SOCK_SEQPACKET Unix socket. Everything else (credit, shutdown, RST,
 * timeouts, limits) is the stream path of `connection.ts`.
 *
 * Guest -> host: packets are collected in the connection's `toHost` backlog until the one
 * with EOM, then the whole message goes to the host socket as one record (one `send()`).
 * The credit we gave bounds what can wait (Linux refuses to send a message larger than our
 * buf_alloc). A message larger than the host socket takes in one record (EMSGSIZE) ends the
 * connection with a log line and RST, never silently truncated.
 *
 * Host -> guest: each host record is read whole (its size peeked first) and delivered as
 * one guest message, split into packets as the guest's buffers and credit allow, EOM on
 * the last. A record larger than the guest's buf_alloc could never be accepted whole: it
 * ends the connection (log line and RST). AF_UNIX carries no MSG_EOR, so SEQ_EOR is never
 * set toward the guest and is not visible to the host app.
 */
import { EAGAIN, EMSGSIZE, MSG_PEEK, MSG_TRUNC, pollFds, POLLHUP } from "../../ffi/mod.ts";
import type { DescChain } from "../virtio/desc_chain.ts";
import type { VsockConnection } from "./connection.ts";
import {
  MAX_PKT_PAYLOAD,
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_SEQ_EOM,
} from "./constants.ts";

/** A buffer for the zero-length iovec of a message-size peek. */
const PEEK_BYTE = new Uint8Array(1);
/** poll(2) event: the peer shut down its writing side. */
const POLLRDHUP = 0x2000;

export class SeqpacketMessages {
  /** lengths of the complete guest messages queued in `toHost`, oldest first */
  readonly #toHost: number[] = [];
  /** bytes of the guest message still being received (no EOM yet) in `toHost` */
  #partial = 0;
  /** the host message being delivered to the guest, and how far */
  #out: Uint8Array | null = null;
  #outOffset = 0;

  constructor(readonly conn: VsockConnection) {}

  /** A host message is being delivered (more packets owed). */
  get delivering(): boolean {
    return this.#out !== null;
  }

  /** The guest stopped sending in the middle of a message: it will never end. */
  dropPartial(): void {
    if (this.#partial === 0) return;
    this.conn.toHost.dropTail(this.#partial);
    this.#partial = 0;
  }

  /** An RW packet of the guest (`len` payload bytes after the header; EOM in `flags`). */
  fromGuest(chain: DescChain, len: number, flags: number): void {
    const c = this.conn;
    if (len > 0) {
      if (!c.queueToHost(len)) return;
      c.copyToHost(chain, VIRTIO_VSOCK_HDR_SIZE, len);
      this.#partial += len;
    }
    if ((flags & VIRTIO_VSOCK_SEQ_EOM) === 0) return;
    this.#toHost.push(this.#partial);
    this.#partial = 0;
    if (this.#toHost.length === 1) this.flush();
  }

  /** Sends the complete queued messages, one record each; false if some wait. */
  flush(): boolean {
    const c = this.conn;
    const io = c.ctx.msgIo;
    while (this.#toHost.length > 0) {
      const len = this.#toHost[0];
      const [a, b] = c.toHost.peek(len); // two parts when the message wraps in the ring
      io.setIov(0, a);
      if (b.length > 0) io.setIov(1, b);
      const n = io.send(c.hostFd, b.length > 0 ? 2 : 1);
      if (n === -EAGAIN) return false;
      if (n < 0) {
        c.ctx.logFault(
          n === -EMSGSIZE
            ? `vsock: a ${len}-byte guest message is larger than the host socket of ` +
              `${c.describe()} takes in one record; resetting`
            : `vsock: host app of ${c.describe()} closed (errno ${-n}); resetting`,
        );
        c.reset();
        return false;
      }
      c.toHost.consume(len);
      this.#toHost.shift();
      c.forwarded(len);
    }
    return true;
  }

  /**
   * The next part of the host message being delivered (reading the next message whole from
   * the host socket first), EOM on its last part; -1 if nothing went into `chain`.
   */
  fill(chain: DescChain, room: number): number {
    const c = this.conn;
    if (this.#out === null) {
      if (c.fromHost !== null) { // the rest of the CONNECT message
        this.#out = c.fromHost;
        c.fromHost = null;
      } else if (!this.#read()) {
        return -1;
      }
      this.#outOffset = 0;
    }
    const msg = this.#out!;
    const left = msg.length - this.#outOffset;
    const n = Math.min(room, c.credit.peerFree(), MAX_PKT_PAYLOAD, left);
    if (n <= 0 && left > 0) return -1;
    chain.writeFrom(msg.subarray(this.#outOffset, this.#outOffset + n), VIRTIO_VSOCK_HDR_SIZE);
    this.#outOffset += n;
    const last = this.#outOffset >= msg.length;
    if (last) this.#out = null;
    c.credit.consumeTx(n);
    c.ctx.stats.rxBytes += n;
    c.initHeader(VIRTIO_VSOCK_OP_RW, last ? VIRTIO_VSOCK_SEQ_EOM : 0, n);
    c.ctx.emit(chain);
    return VIRTIO_VSOCK_HDR_SIZE + n;
  }

  /** Reads the next host message whole into `#out`; false if none. */
  #read(): boolean {
    const c = this.conn;
    const io = c.ctx.msgIo;
    io.setIov(0, PEEK_BYTE, 0);
    const size = io.recv(c.hostFd, 1, MSG_PEEK | MSG_TRUNC);
    if (size === -EAGAIN) {
      c.hostReadable = false;
      return false;
    }
    if (size < 0) {
      c.ctx.logEvent(
        `vsock: host socket error on ${c.describe()} (errno ${-size}); resetting`,
      );
      c.reset();
      return false;
    }
    if (size === 0 && (pollFds([c.hostFd], [0], 0)[0] & (POLLHUP | POLLRDHUP)) !== 0) {
      c.hostEofSeen();
      return false;
    }
    if (size > c.credit.peerBufAlloc) {
      c.ctx.logFault(
        `vsock: a ${size}-byte host message is larger than the guest's buffer ` +
          `(${c.credit.peerBufAlloc}) on ${c.describe()}; resetting`,
      );
      c.reset();
      return false;
    }
    const msg = new Uint8Array(size);
    io.setIov(0, msg);
    const n = io.recv(c.hostFd, 1);
    if (n !== size) {
      c.ctx.logEvent(`vsock: host message read failed on ${c.describe()}; resetting`);
      c.reset();
      return false;
    }
    this.#out = msg;
    return true;
  }
}
