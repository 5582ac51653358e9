/**
 * virtio-vsock numbers, named after the virtio 1.3 "Socket Device" section (device id 19)
 * and Linux's `include/uapi/linux/virtio_vsock.h`.
 *
 * The device has three virtqueues: rx (device -> driver packets), tx (driver -> device
 * packets) and event (device -> driver `struct virtio_vsock_event {le32 id}`). Its config
 * space is `struct virtio_vsock_config {le64 guest_cid}`, whose upper 32 bits are reserved
 * and zero. Every packet starts with the 44-byte little-endian `struct virtio_vsock_hdr`
 * (see `packet.ts`); `op` says what the packet does, `type` which socket type it belongs to.
 *
 * Besides the spec's numbers this module holds the limits this backend chooses (buffer
 * sizes, thresholds, timeouts), each with the reason for its value, and small helpers for
 * CIDs and log output.
 */

// ---------------------------------------------------------------------------------------
// Device identity and virtqueues
// ---------------------------------------------------------------------------------------

/** virtio device id of the socket device. */
export const VIRTIO_ID_VSOCK = 19;

/** rx virtqueue: packets from the device (host, siblings) to the driver. */
export const VSOCK_VQ_RX = 0;
/** tx virtqueue: packets from the driver to the device. */
export const VSOCK_VQ_TX = 1;
/** event virtqueue: `virtio_vsock_event` buffers the device fills (TRANSPORT_RESET). */
export const VSOCK_VQ_EVENT = 2;
/** Number of virtqueues of the device. */
export const VSOCK_VQ_COUNT = 3;

// ---------------------------------------------------------------------------------------
// Feature bits (bit positions in the 64-bit virtio feature word)
// ---------------------------------------------------------------------------------------

/** Stream sockets are supported (implied when no vsock feature bit is negotiated). */
export const VIRTIO_VSOCK_F_STREAM = 0;
/** Seqpacket sockets are supported. */
export const VIRTIO_VSOCK_F_SEQPACKET = 1;
/** Stream sockets are *not* implied; only the negotiated socket-type bits apply. */
export const VIRTIO_VSOCK_F_NO_IMPLIED_STREAM = 2;
/**
 * Datagram sockets are supported. NOT part of the virtio spec: this backend's opt-in bit.
 *
 * The 2022 RFC that introduced vsock datagrams ("virtio/vsock: add VIRTIO_VSOCK_F_DGRAM
 * feature bit", Bobby Eshleman) numbered it 2, but bit 2 has since been standardised as
 * VIRTIO_VSOCK_F_NO_IMPLIED_STREAM, as its reviewers pointed out. Bit 3 is the next free
 * one. It is only offered when the operator enables datagrams, so a driver that reads bit 3
 * as something else never sees it by default.
 */
export const VIRTIO_VSOCK_F_DGRAM = 3;

// ---------------------------------------------------------------------------------------
// Header: op, type, flags
// ---------------------------------------------------------------------------------------

/** Size in bytes of `struct virtio_vsock_hdr`. */
export const VIRTIO_VSOCK_HDR_SIZE = 44;

/** Never valid on the wire. */
export const VIRTIO_VSOCK_OP_INVALID = 0;
/** Connect request. */
export const VIRTIO_VSOCK_OP_REQUEST = 1;
/** Connect accepted. */
export const VIRTIO_VSOCK_OP_RESPONSE = 2;
/** Connection refused or forcibly closed; also the final step of a clean close. */
export const VIRTIO_VSOCK_OP_RST = 3;
/** Half or full close; `flags` holds VIRTIO_VSOCK_SHUTDOWN_F_* (sticky once sent). */
export const VIRTIO_VSOCK_OP_SHUTDOWN = 4;
/** Payload-carrying packet (the only op with `len` > 0). */
export const VIRTIO_VSOCK_OP_RW = 5;
/** Unsolicited or requested report of the sender's buf_alloc / fwd_cnt. */
export const VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6;
/** Asks the peer to answer with a CREDIT_UPDATE. */
export const VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7;
/** Largest defined op value. */
export const VIRTIO_VSOCK_OP_MAX = VIRTIO_VSOCK_OP_CREDIT_REQUEST;

/** In-order, reliable, connection-oriented byte stream. */
export const VIRTIO_VSOCK_TYPE_STREAM = 1;
/** Like STREAM, with message (EOM) and record (EOR) boundaries. */
export const VIRTIO_VSOCK_TYPE_SEQPACKET = 2;
/**
 * Connectionless datagrams. Not in the spec: the value used by the Linux datagram RFC
 * series (`VIRTIO_VSOCK_TYPE_DGRAM = 3`); only valid when VIRTIO_VSOCK_F_DGRAM is acked.
 */
export const VIRTIO_VSOCK_TYPE_DGRAM = 3;

// SHUTDOWN flags. The spec lists them as bit numbers (RECEIVE 0, SEND 1); these are the
// masks as they appear in `flags`.

/** SHUTDOWN flag: the sender will not receive any more data. */
export const VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE = 1;
/** SHUTDOWN flag: the sender will not send any more data. */
export const VIRTIO_VSOCK_SHUTDOWN_F_SEND = 2;
/** Both directions closed. */
export const VIRTIO_VSOCK_SHUTDOWN_F_BOTH = VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE |
  VIRTIO_VSOCK_SHUTDOWN_F_SEND;

/** SEQPACKET RW flag: last packet of a message (one send() call). */
export const VIRTIO_VSOCK_SEQ_EOM = 1;
/** SEQPACKET RW flag: last packet of a record (the sender used MSG_EOR). */
export const VIRTIO_VSOCK_SEQ_EOR = 2;

// ---------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------

/** Event id: communication was interrupted (e.g. migration); the driver drops connections,
 * keeps listeners and re-reads guest_cid. */
export const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0;
/** Size in bytes of `struct virtio_vsock_event {le32 id}`. */
export const VIRTIO_VSOCK_EVENT_SIZE = 4;

// ---------------------------------------------------------------------------------------
// CIDs and config space
// ---------------------------------------------------------------------------------------

/** Reserved (historically the hypervisor). */
export const VMADDR_CID_HYPERVISOR = 0;
/** Reserved (local loopback inside the guest). */
export const VMADDR_CID_LOCAL = 1;
/** Well-known CID of the host. */
export const VSOCK_HOST_CID = 2;
/** Reserved (VMADDR_CID_ANY, -1U). */
export const VMADDR_CID_ANY = 0xffffffff;
/** The CIDs the spec reserves below 2^32 (0xffffffffffffffff is reserved too, and any CID
 * >= 2^32 is already invalid because the upper 32 bits are reserved). */
export const RESERVED_CIDS: readonly number[] = Object.freeze([
  VMADDR_CID_HYPERVISOR,
  VMADDR_CID_LOCAL,
  VSOCK_HOST_CID,
  VMADDR_CID_ANY,
]);

/** True when `cid` may be a guest's context id: an integer in [3, 0xfffffffe]. */
export function isValidGuestCid(cid: number): boolean {
  return Number.isInteger(cid) && cid > VSOCK_HOST_CID && cid < VMADDR_CID_ANY;
}

/** Size in bytes of `struct virtio_vsock_config`. */
export const VIRTIO_VSOCK_CONFIG_SIZE = 8;
/** Offset of `le64 guest_cid` in the config space. */
export const VIRTIO_VSOCK_CONFIG_GUEST_CID = 0;

/**
 * Writes `struct virtio_vsock_config` for `guestCid` at `view[off..off+8)`: the CID as the
 * low le32, zero as the (reserved) high le32.
 */
export function writeVsockConfig(view: DataView, off: number, guestCid: number): void {
  if (!isValidGuestCid(guestCid)) throw new RangeError(`invalid guest CID ${guestCid}`);
  view.setUint32(off + VIRTIO_VSOCK_CONFIG_GUEST_CID, guestCid, true);
  view.setUint32(off + VIRTIO_VSOCK_CONFIG_GUEST_CID + 4, 0, true);
}

// ---------------------------------------------------------------------------------------
// Limits this backend chooses
// ---------------------------------------------------------------------------------------

/**
 * Largest payload (`len`) of one packet, in both directions: 64 KiB, Linux's
 * VIRTIO_VSOCK_MAX_PKT_BUF_SIZE. Linux never sends more in one RW packet, and a guest that
 * claims more is rejected by `validateHeader`.
 */
export const MAX_PKT_PAYLOAD = 64 * 1024;

/**
 * Receive buffer we advertise per connection (`buf_alloc`), i.e. how many payload bytes
 * the guest may have sent us that we have not yet forwarded to the host application.
 *
 * 256 KiB is Linux's default vsock buffer size (VIRTIO_VSOCK_DEFAULT_BUF_SIZE, the
 * SO_VM_SOCKETS_BUFFER_SIZE default), so both directions get the same window. A 64 KiB
 * window (Firecracker's and vhost-device-vsock's default) equals one maximal packet: the
 * guest would stall for a credit round trip after every packet. It is also the memory bound
 * per connection when the host application reads slower than the guest writes.
 */
export const DEFAULT_BUF_ALLOC = 256 * 1024;

/**
 * Send a CREDIT_UPDATE once our free space has grown by this much since the fwd_cnt we last
 * told the peer (clamped to half of buf_alloc for small buffers, see `credit.ts`).
 *
 * One maximal packet: with the default 256 KiB buffer the guest's view of our free space
 * stays above 192 KiB while forwarding keeps pace, so it never stalls, and the update costs
 * one rx buffer per 64 KiB of data. Linux waits longer (until the peer may see < 64 KiB
 * free) and Firecracker uses a 4 KiB low-water mark on a 64 KiB buffer; both accept stalls
 * we need not take. Smaller thresholds would produce "silly window" updates.
 */
export const CREDIT_UPDATE_THRESHOLD = 64 * 1024;

/** Most simultaneous connections per guest by default (`--max-connections`; Firecracker's
 * limit). */
export const MAX_CONNECTIONS = 1023;

/** How long a host-initiated REQUEST may wait for the guest's RESPONSE by default
 * (`--connect-timeout-ms`; Firecracker: 2 s). */
export const CONNECT_TIMEOUT_MS = 2000;

/**
 * How long a full close (SHUTDOWN with both flags sent after the host app closed its socket)
 * may wait for the guest's RST before we send one (Firecracker: 2 s; the spec leaves it to
 * the implementation).
 */
export const SHUTDOWN_TIMEOUT_MS = 2000;

/**
 * How long a connection the guest closed may keep draining queued bytes into a slow host
 * app; longer than Linux's VSOCK_CLOSE_TIMEOUT (8 s), after which the guest resets anyway.
 */
export const CLOSE_DRAIN_TIMEOUT_MS = 10_000;

// ---------------------------------------------------------------------------------------
// Names for logs
// ---------------------------------------------------------------------------------------

const OP_NAMES: readonly string[] = [
  "INVALID",
  "REQUEST",
  "RESPONSE",
  "RST",
  "SHUTDOWN",
  "RW",
  "CREDIT_UPDATE",
  "CREDIT_REQUEST",
];

/** Indexed by type value; 0 is not a type. */
const TYPE_NAMES: readonly string[] = ["", "STREAM", "SEQPACKET", "DGRAM"];

/** Spec name of an op ("REQUEST", ...), or "OP_<n>" for an unknown value. */
export function opName(op: number): string {
  return Number.isInteger(op) && op >= 0 && op < OP_NAMES.length ? OP_NAMES[op] : `OP_${op}`;
}

/** Spec name of a socket type ("STREAM", ...), or "TYPE_<n>" for an unknown value. */
export function typeName(type: number): string {
  return Number.isInteger(type) && type > 0 && type < TYPE_NAMES.length
    ? TYPE_NAMES[type]
    : `TYPE_${type}`;
}
