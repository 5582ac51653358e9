/**
 * Message sockets (SOCK_SEQPACKET, SOCK_DGRAM): sendmsg/recvmsg of one message at a time,
 * with record flags (MSG_EOR, MSG_TRUNC) and, for datagrams, the peer's Unix address.
 *
 * A `MessageIo` owns one `struct msghdr`, an iovec array and a `struct sockaddr_un` buffer,
 * allocated once and reused: a call allocates nothing. The data itself goes through
 * caller-built iovecs (pointing into guest memory or a buffer), so payload is never copied
 * here. Layouts as in socket.ts (x86_64 `struct msghdr`, 56 bytes).
 */
import { errno } from "./errno.ts";
import { sys } from "./libc.ts";
import { AF_UNIX, MSG_NOSIGNAL } from "./socket.ts";

/** recvmsg/sendmsg flag: end of record (SOCK_SEQPACKET message boundary marker). */
export const MSG_EOR = 0x80;
/** recvmsg flag: return the real length of a message longer than the buffer. */
export const MSG_TRUNC = 0x20;
/** recv flag: look at the next message without taking it. */
export const MSG_PEEK = 0x2;
/** EPROTOTYPE: connect() to a Unix socket of another type. */
export const EPROTOTYPE = 91;

/** Most iovecs one message may use. */
export const MESSAGE_MAX_IOV = 64;
const SOCKADDR_UN_SIZE = 110;
const EINTR = 4;

function ptr(buf: ArrayBufferView): bigint {
  return BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf)));
}

const decoder = new TextDecoder();

export class MessageIo {
  /** iovecs for `send`/`recv`: (base, len) pairs as u64, filled by the caller */
  readonly iov: BigUint64Array = new BigUint64Array(2 * MESSAGE_MAX_IOV);
  readonly #iovWords = new Uint32Array(this.iov.buffer);
  readonly #msg = new BigUint64Array(7);
  readonly #msgBytes = new Uint8Array(this.#msg.buffer);
  readonly #msgView = new DataView(this.#msg.buffer);
  readonly #msgWords = new Uint32Array(this.#msg.buffer);
  readonly #name = new Uint8Array(SOCKADDR_UN_SIZE);
  readonly #namePtr: bigint;
  readonly #iovPtr: bigint;
  /**
   * The buffers `setIov` points at, kept alive here: an iovec holds only an address, so a
   * buffer nobody else references (say `setIov(0, encoder.encode(line))`) could otherwise
   * be collected and its memory reused while the iovec still points at it.
   */
  readonly #buffers: (Uint8Array | undefined)[] = new Array(MESSAGE_MAX_IOV).fill(undefined);
  /** msg_flags of the last `recv` (MSG_EOR, MSG_TRUNC) */
  flags = 0;

  constructor() {
    this.#namePtr = ptr(this.#name);
    this.#iovPtr = ptr(this.iov);
  }

  /** Fills the msghdr: name, its length, the first `iovCount` iovecs, no control data. */
  #prepare(name: bigint, nameLen: number, iovCount: number): void {
    const m = this.#msg;
    m[0] = name;
    m[2] = this.#iovPtr;
    const w = this.#msgWords; // the u64 counts as u32 halves: no BigInt per call
    w[2] = nameLen;
    w[3] = 0;
    w[6] = iovCount;
    w[7] = 0;
    w.fill(0, 8, 14); // control pointer and length, msg_flags
  }

  /** Sets iovec `i` to `buf` (a whole typed array): for small control buffers. */
  setIov(i: number, buf: Uint8Array, len = buf.byteLength): void {
    this.#buffers[i] = buf;
    this.iov[2 * i] = len > 0 ? ptr(buf) : 0n;
    this.iov[2 * i + 1] = BigInt(len);
  }

  /**
   * Sets iovec `i` to (host address, len) without a BigInt (little-endian host). The caller
   * keeps the memory alive (guest memory, mapped for the device's life).
   */
  setIovRaw(i: number, addr: number, len: number): void {
    const w = this.#iovWords;
    w[4 * i] = addr % 0x1_0000_0000;
    w[4 * i + 1] = Math.floor(addr / 0x1_0000_0000);
    w[4 * i + 2] = len;
    w[4 * i + 3] = 0;
  }

  /**
   * sendmsg of the first `iovCount` iovecs as one message, to `to` (a sockaddr_un from
   * socket.ts `sockaddrUn`) or the connected peer. Returns bytes sent or -errno (never SIGPIPE).
   */
  send(fd: number, iovCount: number, flags = 0, to: Uint8Array | null = null): number {
    this.#prepare(to === null ? 0n : ptr(to), to === null ? 0 : to.byteLength, iovCount);
    for (;;) {
      const n = sys.sendmsg(fd, this.#msgBytes, flags | MSG_NOSIGNAL);
      if (n >= 0) return n;
      const e = errno();
      if (e !== EINTR) return -e;
      void to?.byteLength;
    }
  }

  /**
   * recvmsg of one message into the first `iovCount` iovecs. Returns its length (with
   * MSG_TRUNC in `flags`: the real length, larger than the iovecs) or -errno; `flags` gets
   * msg_flags; with `withName` the sender's address is kept for `senderPath`.
   */
  recv(fd: number, iovCount: number, flags = 0, withName = false): number {
    this.#prepare(withName ? this.#namePtr : 0n, withName ? SOCKADDR_UN_SIZE : 0, iovCount);
    for (;;) {
      const n = sys.recvmsg(fd, this.#msgBytes, flags);
      if (n >= 0) {
        this.flags = this.#msgView.getInt32(48, true);
        return n;
      }
      const e = errno();
      if (e !== EINTR) return -e;
    }
  }

  /**
   * The sender's path bytes from the last `recv(..., withName)` (a view, valid until the
   * next recv; empty for an unbound sender): for matching without building a string.
   */
  senderPathBytes(): Uint8Array {
    const len = this.#msgView.getUint32(8, true);
    if (len <= 2 || this.#name[0] !== AF_UNIX) return this.#name.subarray(0, 0);
    let end = 2;
    while (end < len && this.#name[end] !== 0) end++;
    return this.#name.subarray(2, end);
  }

  /** The sender's path from the last `recv(..., withName)`, or "" (unbound sender). */
  senderPath(): string {
    const len = this.#msgView.getUint32(8, true); // socklen_t msg_namelen
    if (len <= 2 || this.#name[0] !== AF_UNIX) return "";
    let end = 2;
    while (end < len && this.#name[end] !== 0) end++;
    return decoder.decode(this.#name.subarray(2, end));
  }
}
