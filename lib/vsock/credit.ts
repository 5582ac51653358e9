/**
 * Per-connection credit accounting (virtio 1.3 "Socket Device", Buffer Space Management).
 *
 * Each side of a stream or seqpacket connection publishes, in every packet header:
 * - `buf_alloc`: its total receive buffer for this connection, in payload bytes;
 * - `fwd_cnt`:   a free-running u32 count of payload bytes it has consumed (for us: handed
 *                to the host application or sibling).
 *
 * The sender keeps `tx_cnt`, a free-running u32 count of payload bytes it has sent, and may
 * only send RW payload while
 *
 *     peer_free = peer_buf_alloc - (tx_cnt - peer_fwd_cnt)        (all u32, wrapping)
 *
 * is positive. `tx_cnt - peer_fwd_cnt` is the payload in flight or buffered at the peer;
 * header bytes never count. A sender short of credit waits for a CREDIT_UPDATE (which the
 * receiver may send at any time) or asks for one with CREDIT_REQUEST.
 *
 * This class holds both directions for one connection:
 * - our receive side: `bufAlloc` (what we advertise), `rxCnt` (payload received from the
 *   peer), `fwdCnt` (payload we forwarded), and what the peer last heard from us
 *   (`lastSentFwdCnt`, `lastSentBufAlloc`);
 * - our send side: `peerBufAlloc`, `peerFwdCnt` (from the peer's latest header) and `txCnt`.
 *
 * Every counter is a u32 that wraps at 2^32 (`>>> 0` after each addition); differences are
 * taken modulo 2^32 too, which is right as long as no difference reaches 2^32, and the
 * buffers involved are far smaller.
 *
 * When to send a CREDIT_UPDATE (`needsCreditUpdate`): the peer's idea of our free space is
 * `lastSentBufAlloc - (its tx_cnt - lastSentFwdCnt)`; every byte we forward grows the real
 * free space by one without the peer knowing. We tell it once that growth,
 * `fwdCnt - lastSentFwdCnt`, reaches CREDIT_UPDATE_THRESHOLD (at most half the buffer), or
 * when `bufAlloc` changed. Batching avoids a "silly window" update per small read; the
 * threshold being at most half of `bufAlloc` means a peer that filled our whole window is
 * always unblocked once we have forwarded half of it. Linux's transport uses the same idea
 * with a later trigger (`buf_alloc - (fwd_cnt - last_fwd_cnt) < 64 KiB`, in
 * `virtio_transport_do_dequeue`); Firecracker sends one when that estimate drops below
 * 4 KiB. Any packet we send carries our credit, so callers stamp every outgoing header with
 * `stamp()` and the explicit CREDIT_UPDATE is only needed when there is nothing else to send.
 * This assumes, as Linux does, that a sender uses partial credit; a peer wanting more can
 * always send CREDIT_REQUEST, which the connection answers at once.
 */

import { CREDIT_UPDATE_THRESHOLD, DEFAULT_BUF_ALLOC } from "./constants.ts";

/** Throws unless `n` is an integer in [0, 2^32). */
function checkU32(n: number, what: string): void {
  if (n >>> 0 !== n) throw new RangeError(`${what}: ${n} is not a u32`);
}

/** Credit state of one connection. Fields are public for snapshot/restore and logs; change
 * them through the methods. */
export class Credit {
  // --- our receive side ---------------------------------------------------------------
  /** Receive buffer we advertise (`buf_alloc` in our headers). */
  bufAlloc: number;
  /** Payload bytes we have forwarded to the host side (`fwd_cnt` in our headers). */
  fwdCnt = 0;
  /** Payload bytes received from the peer. */
  rxCnt = 0;
  /** `fwdCnt` as of the last header we sent. */
  lastSentFwdCnt = 0;
  /** `bufAlloc` as of the last header we sent. */
  lastSentBufAlloc: number;
  /**
   * Most payload we accept buffered (`rxCnt - fwdCnt`): the largest `bufAlloc` ever set on
   * this connection, since the peer may still act on an older, larger advertisement.
   */
  rxLimit: number;
  /** Threshold configured for `needsCreditUpdate` (before clamping to `bufAlloc / 2`). */
  threshold: number;

  // --- our send side -------------------------------------------------------------------
  /** The peer's receive buffer (its latest `buf_alloc`). */
  peerBufAlloc = 0;
  /** The peer's latest `fwd_cnt`. */
  peerFwdCnt = 0;
  /** Payload bytes we have sent to the peer. */
  txCnt = 0;

  /**
   * `bufAlloc` is the buffer we advertise; it counts as sent (the handshake packet carries
   * it, stamped with `stamp()`).
   */
  constructor(bufAlloc: number = DEFAULT_BUF_ALLOC, threshold: number = CREDIT_UPDATE_THRESHOLD) {
    checkU32(bufAlloc, "bufAlloc");
    checkU32(threshold, "threshold");
    this.bufAlloc = bufAlloc;
    this.lastSentBufAlloc = bufAlloc;
    this.rxLimit = bufAlloc;
    this.threshold = threshold;
  }

  /** Back to a fresh connection's state (for pooled objects). */
  reset(bufAlloc: number = DEFAULT_BUF_ALLOC): void {
    checkU32(bufAlloc, "bufAlloc");
    this.bufAlloc = bufAlloc;
    this.lastSentBufAlloc = bufAlloc;
    this.rxLimit = bufAlloc;
    this.fwdCnt = 0;
    this.rxCnt = 0;
    this.lastSentFwdCnt = 0;
    this.peerBufAlloc = 0;
    this.peerFwdCnt = 0;
    this.txCnt = 0;
  }

  // --- send side -----------------------------------------------------------------------

  /** Payload bytes we sent that the peer has not consumed yet: `tx_cnt - peer_fwd_cnt`. */
  peerInFlight(): number {
    return (this.txCnt - this.peerFwdCnt) >>> 0;
  }

  /**
   * Payload bytes we may send now: `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`, clamped to
   * 0 (a peer whose fwd_cnt runs ahead of our tx_cnt, or that shrank its buffer, gets none).
   * Never more than `peerBufAlloc`.
   */
  peerFree(): number {
    const free = this.peerBufAlloc - this.peerInFlight();
    return free > 0 ? free : 0;
  }

  /** Records `n` payload bytes sent in an RW packet. Throws if `n` exceeds `peerFree()`:
   * sending beyond the peer's credit would break the spec, so it is a caller bug. */
  consumeTx(n: number): void {
    checkU32(n, "consumeTx");
    if (n > this.peerFree()) {
      throw new RangeError(`consumeTx: ${n} bytes exceed the peer's credit ${this.peerFree()}`);
    }
    this.txCnt = (this.txCnt + n) >>> 0;
  }

  /** Takes `buf_alloc` and `fwd_cnt` from a header the peer sent (any op). */
  updateFromPeer(bufAlloc: number, fwdCnt: number): void {
    this.peerBufAlloc = bufAlloc >>> 0;
    this.peerFwdCnt = fwdCnt >>> 0;
  }

  // --- receive side --------------------------------------------------------------------

  /** Payload bytes received and not yet forwarded: `rx_cnt - fwd_cnt`. */
  buffered(): number {
    return (this.rxCnt - this.fwdCnt) >>> 0;
  }

  /**
   * Records an RW payload of `n` bytes from the peer. Returns false, and records nothing,
   * if it would leave more than `rxLimit` bytes buffered, i.e. the peer sent beyond the
   * credit we gave it (the connection should be reset).
   */
  onReceived(n: number): boolean {
    checkU32(n, "onReceived");
    if (this.buffered() + n > this.rxLimit) return false;
    this.rxCnt = (this.rxCnt + n) >>> 0;
    return true;
  }

  /** Records `n` received bytes handed to the host side. Throws if more than `buffered()`. */
  onForwarded(n: number): void {
    checkU32(n, "onForwarded");
    if (n > this.buffered()) {
      throw new RangeError(`onForwarded: ${n} bytes exceed the ${this.buffered()} buffered`);
    }
    this.fwdCnt = (this.fwdCnt + n) >>> 0;
  }

  /** Changes the buffer we advertise; the peer learns it from the next stamped header. */
  setBufAlloc(bufAlloc: number): void {
    checkU32(bufAlloc, "bufAlloc");
    this.bufAlloc = bufAlloc;
    if (bufAlloc > this.rxLimit) this.rxLimit = bufAlloc;
  }

  /** Free space the peer believes we have: `lastSentBufAlloc - (rxCnt - lastSentFwdCnt)`,
   * counting what we received (bytes still in flight to us are not known here). */
  peerSeenFree(): number {
    const free = this.lastSentBufAlloc - ((this.rxCnt - this.lastSentFwdCnt) >>> 0);
    return free > 0 ? free : 0;
  }

  /** The threshold in effect: `min(threshold, max(1, floor(bufAlloc / 2)))`. */
  effectiveThreshold(): number {
    return Math.max(1, Math.min(this.threshold, Math.floor(this.bufAlloc / 2)));
  }

  /**
   * True when the peer should get a CREDIT_UPDATE now: our free space grew by at least
   * `effectiveThreshold()` since the fwd_cnt we last sent, or `bufAlloc` changed.
   */
  needsCreditUpdate(): boolean {
    if (this.bufAlloc !== this.lastSentBufAlloc) return true;
    return ((this.fwdCnt - this.lastSentFwdCnt) >>> 0) >= this.effectiveThreshold();
  }

  /** Records that a header carrying our current `bufAlloc` and `fwdCnt` was sent. */
  markCreditSent(): void {
    this.lastSentFwdCnt = this.fwdCnt;
    this.lastSentBufAlloc = this.bufAlloc;
  }

  /** Writes our credit into an outgoing header and marks it sent. */
  stamp(h: { bufAlloc: number; fwdCnt: number }): void {
    h.bufAlloc = this.bufAlloc;
    h.fwdCnt = this.fwdCnt;
    this.markCreditSent();
  }
}
