/**
 * The public types of the testing guest driver (`VsockGuest`, guest_driver.ts): socket types,
 * its options, counters, raw-chain descriptors for fault injection, packet captures and
 * snapshots. They
 * live apart from the driver so that its parts (guest_rings.ts, guest_transport.ts) can share
 * them without importing the driver itself.
 */

import type { PacketHeader } from "../vsock/packet.ts";

/**
 * Connection-oriented socket types: "stream" (SOCK_STREAM, VIRTIO_VSOCK_TYPE_STREAM) or
 * "seqpacket" (SOCK_SEQPACKET, VIRTIO_VSOCK_TYPE_SEQPACKET: message boundaries carried by
 * VIRTIO_VSOCK_SEQ_EOM / _EOR on RW packets).
 */
export type GuestSocketType = "stream" | "seqpacket";

/** Options of `VsockGuest.boot`. */
export interface VsockGuestOptions {
  /** payload bytes per rx buffer (default 4096, Linux's; 65536 for big buffers) */
  readonly rxBufSize?: number;
  /** rx buffers to allocate (default: the queue size, so the ring is filled) */
  readonly rxBuffers?: number;
  /** "half": refill when fewer than half are posted (Linux, default); "always": at once */
  readonly rxRefill?: "half" | "always";
  /** tx packets in flight at most (default min(queue size, 64)) */
  readonly txSlots?: number;
  /** largest RW payload per packet (default 65536, Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE) */
  readonly maxPacketPayload?: number;
  /** descriptors per tx payload (default 1) */
  readonly txPayloadSegments?: number;
  /** buf_alloc advertised per connection (default 256 KiB, Linux's) */
  readonly bufAlloc?: number;
  /** event buffers (default 8) */
  readonly eventBuffers?: number;
  /** connect() timeout (default 2000 ms, Linux's) */
  readonly connectTimeoutMs?: number;
  /** close() wait for the peer's RST (default 8000 ms, Linux's) */
  readonly closeTimeoutMs?: number;
  /** default timeout of every other wait (default 10000 ms) */
  readonly timeoutMs?: number;
  /** extra device feature bits to ack when offered (e.g. VIRTIO_VSOCK_F_STREAM's mask) */
  readonly ackFeatures?: bigint;
  /** feature bits never to ack */
  readonly withholdFeatures?: bigint;
  /**
   * race: post rx/event buffers and kick after SET_VRING_KICK but before SET_VRING_ENABLE
   * ("never drop a kick": a kick that arrives before the ring is enabled must not be lost)
   */
  readonly kickBeforeEnable?: boolean;
  /** first local port connect() uses (default 1024; Linux picks a random one above 1023) */
  readonly firstEphemeralPort?: number;
  /**
   * receive queue bound of each datagram socket in payload bytes (default 212992, Linux's
   * net.core.rmem_default for sk_rcvbuf); a datagram arriving at a fuller queue is dropped
   * and counted
   */
  readonly dgramRcvBuf?: number;
}

/** Counters for tests and benchmarks. */
export interface GuestStats {
  /** kicks written, per queue */
  readonly kicks: number[];
  /** call eventfd signals observed, per queue */
  readonly interrupts: number[];
  /** packets taken from the rx used ring */
  rxPackets: number;
  /** packets put on the tx ring */
  txPackets: number;
  /** RW payload bytes received / sent */
  rxBytes: number;
  txBytes: number;
  /** CREDIT_UPDATE packets sent */
  creditUpdatesSent: number;
  /** tx chains the device returned with a non-zero used length */
  txUsedNonZeroLen: number;
  /** kicks not delivered because the front end was closed */
  kicksLost: number;
  /** datagrams dropped because the bound socket's receive queue was full */
  dgramRxDropped: number;
  /** datagrams dropped because no socket is bound to their port (no RST: connectionless) */
  dgramRxNoSocket: number;
  /** DGRAM packets with an op other than RW (invalid; dropped) */
  dgramRxInvalid: number;
}

/** Fresh counters, all zero. */
export function newGuestStats(): GuestStats {
  return {
    kicks: [0, 0, 0],
    interrupts: [0, 0, 0],
    rxPackets: 0,
    txPackets: 0,
    rxBytes: 0,
    txBytes: 0,
    creditUpdatesSent: 0,
    txUsedNonZeroLen: 0,
    kicksLost: 0,
    dgramRxDropped: 0,
    dgramRxNoSocket: 0,
    dgramRxInvalid: 0,
  };
}

/**
 * One descriptor of a raw chain (`VsockGuest.addRawChain`). On a packed ring the chain takes
 * consecutive ring slots (there is no `next`: a descriptor continues into the following slot
 * when it has NEXT) and every descriptor carries the reserved buffer id.
 */
export interface RawDescriptor {
  /** guest-physical address; a bigint may exceed 2^53 */
  readonly addr: number | bigint;
  readonly len: number;
  /**
   * VRING_DESC_F_* bits (the same values as VIRTQ_DESC_F_*), written verbatim (set NEXT
   * yourself); on a packed ring the AVAIL/USED bits come from `availBits`
   */
  readonly flags: number;
  /** split: `next` as a position in this list (default: the following one, 0 for the last) */
  readonly next?: number;
  /** split: `next` as an absolute descriptor-table index (overrides `next`) */
  readonly nextRaw?: number;
  /** packed: the buffer id to write instead of the reserved one */
  readonly id?: number;
  /** packed: AVAIL/USED bits instead of those that make the descriptor available */
  readonly availBits?: number;
}

/** What the device did with a raw chain. */
export interface RawUsed {
  readonly queue: number;
  readonly head: number;
  readonly len: number;
}

/** A packet seen on the rx or tx ring (see `VsockGuest.capture`). */
export interface CapturedPacket {
  readonly direction: "rx" | "tx";
  readonly header: PacketHeader;
  readonly payload: Uint8Array;
}

/** A running capture: `packets` grows until `stop()`. */
export interface PacketCapture {
  readonly packets: CapturedPacket[];
  stop(): void;
}

/** What `snapshot` saved (crosvm profile). */
export interface GuestSnapshot {
  readonly features: bigint;
  readonly bases: readonly number[];
  readonly deviceState: Uint8Array;
}
