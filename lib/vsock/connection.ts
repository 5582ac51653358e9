/**
 * One vsock stream connection between a guest socket and a host Unix socket.
 *
 * Addressing: the guest side is (guest CID, `peerPort`); the host side is
 * (CID 2, `localPort`). For a guest-initiated connection `localPort` is the port
 * the guest connected to (P, served by `<uds_path>_P`); for a host-initiated one
 * it is a port we allocate (reported to the host app as `OK <localPort>`).
 *
 * Life cycle (virtio 1.3 "Socket Device", 5.10.6.5):
 * - CONNECTING: host-initiated; REQUEST queued/sent to the guest, waiting for
 *   RESPONSE (or RST, or the connect timeout).
 * - ESTABLISHED: data flows; each direction may be shut down on its own
 *   (SHUTDOWN flags from the guest map to shutdown(2) on the host socket; EOF
 *   from the host becomes SHUTDOWN with the SEND flag only).
 * - when both directions are finished, or on any error, the connection ends
 *   with an RST to the guest and the host socket is closed.
 *
 * Packets owed to the guest are kept as flags (`pending`), not as a queue, so
 * one connection never holds more than one of each kind: memory stays bounded
 * however the guest behaves. The device's RX scheduler visits connections
 * round-robin and emits one packet per visit.
 */
import { ByteQueue } from "./byte_queue.ts";
import { Credit } from "./credit.ts";
import type { Timer } from "../reactor.ts";

export const ConnState = {
  CONNECTING: 1,
  ESTABLISHED: 2,
  CLOSED: 3,
} as const;
export type ConnState = typeof ConnState[keyof typeof ConnState];

/** Packets owed to the guest. */
export const Pending = {
  REQUEST: 1,
  RESPONSE: 2,
  SHUTDOWN: 4,
  CREDIT_UPDATE: 8,
  RST: 16,
} as const;

export class VsockConnection {
  state: ConnState;
  readonly credit: Credit;
  /** guest -> host bytes the host socket has not taken yet */
  readonly toHost: ByteQueue;
  /** host -> guest bytes read early (after the CONNECT line), sent before the socket's */
  fromHost: Uint8Array | null = null;
  /** Pending.* bits */
  pending = 0;
  /** SHUTDOWN flags to send with Pending.SHUTDOWN */
  shutdownFlagsToSend = 0;
  /** SHUTDOWN flags received from the guest (sticky) */
  guestShutdown = 0;
  /** the host socket may have data (edge-triggered epoll: true until EAGAIN) */
  hostReadable = false;
  /** the host socket reached EOF (the host app will send no more) */
  hostEof = false;
  /** shutdown(SHUT_WR) was done on the host socket */
  hostWriteShut = false;
  /** the guest closed (SHUTDOWN both) while bytes for the host were still queued: finish
   * delivering them, then close and RST */
  closeWhenFlushed = false;
  /** queued in the RX scheduler */
  inRxQueue = false;
  /** connect timeout (host-initiated) */
  timer: Timer | null = null;
  /** for logs */
  readonly hostInitiated: boolean;

  constructor(
    readonly localPort: number,
    readonly peerPort: number,
    public hostFd: number,
    state: ConnState,
    bufAlloc: number,
    hostInitiated: boolean,
  ) {
    this.state = state;
    this.credit = new Credit(bufAlloc);
    this.toHost = new ByteQueue(bufAlloc);
    this.hostInitiated = hostInitiated;
  }

  /** Something to send to the guest right now (control, early bytes or host data within credit). */
  hasRxWork(): boolean {
    if (this.pending !== 0) return true;
    if (this.state !== ConnState.ESTABLISHED) return false;
    if ((this.guestShutdown & 1) !== 0) return false; // guest will not receive
    if (this.credit.peerFree() <= 0) return false;
    return this.fromHost !== null || (this.hostReadable && !this.hostEof);
  }

  describe(): string {
    return `${
      this.hostInitiated ? "host" : "guest"
    }-initiated 2:${this.localPort} <-> guest:${this.peerPort}`;
  }
}
