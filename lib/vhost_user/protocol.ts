/**
 * vhost-user protocol constants, named after QEMU's `docs/interop/vhost-user.rst`.
 *
 * A vhost-user message is a 12-byte header `{u32 request, u32 flags, u32 size}` followed by
 * `size` bytes of payload, all in the machine's native byte order. The front end (the VMM)
 * sends requests (`VhostUserRequest`) on the main socket; the back end answers with the same
 * request id and the REPLY flag set. With `VHOST_USER_PROTOCOL_F_BACKEND_REQ` the back end may
 * send its own requests (`VhostUserBackendRequest`) on a second socket.
 *
 * Feature negotiation: virtio feature bit 30 (`VHOST_USER_F_PROTOCOL_FEATURES`) in
 * GET_FEATURES announces GET/SET_PROTOCOL_FEATURES, whose u64 carries the
 * `VhostUserProtocolFeature` bits below.
 *
 * This module holds numbers (and the spec's reply column) only; `messages.ts` encodes and
 * decodes the payloads.
 */

import { featureMask } from "../virtio/features.ts";

/** Front-end request ids (`VHOST_USER_*` in the spec's "Front-end message types"). */
export const VhostUserRequest = {
  NONE: 0,
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SEND_RARP: 19,
  NET_SET_MTU: 20,
  /** previously SET_SLAVE_REQ_FD */
  SET_BACKEND_REQ_FD: 21,
  IOTLB_MSG: 22,
  SET_VRING_ENDIAN: 23,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  CREATE_CRYPTO_SESSION: 26,
  CLOSE_CRYPTO_SESSION: 27,
  POSTCOPY_ADVISE: 28,
  POSTCOPY_LISTEN: 29,
  POSTCOPY_END: 30,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  GPU_SET_SOCKET: 33,
  RESET_DEVICE: 34,
  VRING_KICK: 35,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
  GET_SHARED_OBJECT: 41,
  SET_DEVICE_STATE_FD: 42,
  CHECK_DEVICE_STATE: 43,
} as const;
export type VhostUserRequest = typeof VhostUserRequest[keyof typeof VhostUserRequest];

/** Back-end request ids (`VHOST_USER_BACKEND_*`, previously `VHOST_USER_SLAVE_*`). */
export const VhostUserBackendRequest = {
  NONE: 0,
  IOTLB_MSG: 1,
  CONFIG_CHANGE_MSG: 2,
  VRING_HOST_NOTIFIER_MSG: 3,
  VRING_CALL: 4,
  VRING_ERR: 5,
  SHARED_OBJECT_ADD: 6,
  SHARED_OBJECT_REMOVE: 7,
  SHARED_OBJECT_LOOKUP: 8,
} as const;
export type VhostUserBackendRequest =
  typeof VhostUserBackendRequest[keyof typeof VhostUserBackendRequest];

/** Protocol feature bit numbers (`VHOST_USER_PROTOCOL_F_*`). */
export const VhostUserProtocolFeature = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  MTU: 4,
  /** previously SLAVE_REQ */
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  /** previously SLAVE_SEND_FD */
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
  XEN_MMAP: 17,
  SHARED_OBJECT: 18,
  DEVICE_STATE: 19,
} as const;
export type VhostUserProtocolFeature =
  typeof VhostUserProtocolFeature[keyof typeof VhostUserProtocolFeature];

/** Protocol feature masks, `1n << VhostUserProtocolFeature.X`, for the u64 of GET/SET. */
export const VhostUserProtocolFeatureMask = Object.freeze(
  Object.fromEntries(
    Object.entries(VhostUserProtocolFeature).map(([name, bit]) => [name, featureMask(bit)]),
  ),
) as { readonly [K in keyof typeof VhostUserProtocolFeature]: bigint };

/** Virtio feature bit 30 (reserved by virtio): the back end speaks protocol features. */
export const VHOST_USER_F_PROTOCOL_FEATURES = 30;
/** Virtio feature bit 26 (vhost): the front end wants dirty-page logging. */
export const VHOST_F_LOG_ALL = 26;
/** The mask of `VHOST_USER_F_PROTOCOL_FEATURES` in a virtio feature word. */
export const VHOST_USER_F_PROTOCOL_FEATURES_MASK: bigint = featureMask(
  VHOST_USER_F_PROTOCOL_FEATURES,
);
/** The mask of `VHOST_F_LOG_ALL` in a virtio feature word. */
export const VHOST_F_LOG_ALL_MASK: bigint = featureMask(VHOST_F_LOG_ALL);

// --- header --------------------------------------------------------------------------------

/** Size of the header: request, flags, size (u32 each). */
export const VHOST_USER_HDR_SIZE = 12;
/** The protocol version carried in the low two flag bits. */
export const VHOST_USER_VERSION = 0x1;
export const VHOST_USER_VERSION_MASK = 0x3;
/** Set by the back end on every reply. */
export const VHOST_USER_REPLY_MASK = 0x1 << 2;
/** Set by the front end to ask for a u64 ack (needs `VhostUserProtocolFeature.REPLY_ACK`). */
export const VHOST_USER_NEED_REPLY_MASK = 0x1 << 3;
/** Flag bits the spec defines; any other bit makes the header invalid. */
export const VHOST_USER_FLAGS_KNOWN_MASK = VHOST_USER_VERSION_MASK | VHOST_USER_REPLY_MASK |
  VHOST_USER_NEED_REPLY_MASK;

// --- payload bounds --------------------------------------------------------------------------

/** Regions a SET_MEM_TABLE message can carry (QEMU's `VHOST_MEMORY_BASELINE_NREGIONS`). */
export const VHOST_MEMORY_BASELINE_NREGIONS = 8;
/** Memory region description: guest addr, size, user addr, mmap offset (u64 each). */
export const VHOST_USER_MEMORY_REGION_SIZE = 32;
/** SET_MEM_TABLE header before the regions: u32 nregions, u32 padding. */
export const VHOST_USER_MEMORY_HDR_SIZE = 8;
/** ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region. */
export const VHOST_USER_SINGLE_MEMORY_REGION_SIZE = 8 + VHOST_USER_MEMORY_REGION_SIZE;
/** Memory slots this back end supports with CONFIGURE_MEM_SLOTS (libvhost-user's value). */
export const VHOST_USER_MAX_RAM_SLOTS = 32;

/** Config space access header: u32 offset, u32 size, u32 flags. */
export const VHOST_USER_CONFIG_HDR_SIZE = 12;
/** Largest config space a message may carry (QEMU's `VHOST_USER_MAX_CONFIG_SIZE`). */
export const VHOST_USER_MAX_CONFIG_SIZE = 256;
/** SET_CONFIG flags: a write by the driver to a writable field. */
export const VHOST_SET_CONFIG_TYPE_FRONTEND = 0;
/** SET_CONFIG flags: a write during live migration (may touch read-only fields). */
export const VHOST_SET_CONFIG_TYPE_MIGRATION = 1;

/**
 * The largest payload accepted in any message; a header announcing more is rejected before
 * anything is read. The fixed layouts top out at 268 bytes (config: 12 + 256; memory table:
 * 8 + 8 * 32 = 264); the variable CREATE_CRYPTO_SESSION struct is about 1.1 KiB.
 */
export const VHOST_USER_MAX_PAYLOAD_SIZE = 4096;

// --- vring payload bits ------------------------------------------------------------------------

/** SET_VRING_KICK/CALL/ERR u64: bits 0-7 are the vring index. */
export const VHOST_USER_VRING_IDX_MASK = 0xff;
/** SET_VRING_KICK/CALL/ERR u64: bit 8 set means no fd was passed (poll instead). */
export const VHOST_USER_VRING_NOFD_MASK = 0x1 << 8;
/** SET_VRING_ADDR flags bit number: log writes to the used ring. */
export const VHOST_VRING_F_LOG = 0;
/** Dirty log page size: one log bit covers this many bytes of guest memory. */
export const VHOST_LOG_PAGE = 0x1000;

// --- device state transfer (SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE) ------------------------

/** Transfer direction: back end -> front end (migration source). */
export const VHOST_TRANSFER_STATE_DIRECTION_SAVE = 0;
/** Transfer direction: front end -> back end (migration destination). */
export const VHOST_TRANSFER_STATE_DIRECTION_LOAD = 1;
/** Migration phase: guest stopped, device suspended. The only phase the spec defines. */
export const VHOST_TRANSFER_STATE_PHASE_STOPPED = 0;
/** SET_DEVICE_STATE_FD reply u64: bits 0-7 are an error code (0 = success). */
export const VHOST_USER_DEVICE_STATE_ERROR_MASK = 0xff;
/** SET_DEVICE_STATE_FD reply u64: bit 8 set means the back end returns no fd of its own. */
export const VHOST_USER_DEVICE_STATE_NOFD_MASK = 0x1 << 8;

// --- replies ----------------------------------------------------------------------------------

/**
 * The spec's reply column: requests the back end answers whatever was negotiated, and what
 * their reply carries. "data": the value asked for (a failure cannot be expressed in it);
 * "result": a reply that can report failure in its own shape (GET_CONFIG's empty payload,
 * SET_DEVICE_STATE_FD's error bits, CHECK_DEVICE_STATE's u64). SET_LOG_BASE is answered only
 * with LOG_SHMFD, and any other request only with NEED_REPLY under REPLY_ACK.
 */
const ALWAYS_REPLIED: ReadonlyMap<number, "data" | "result"> = new Map([
  [VhostUserRequest.GET_FEATURES, "data"],
  [VhostUserRequest.GET_PROTOCOL_FEATURES, "data"],
  [VhostUserRequest.GET_VRING_BASE, "data"],
  [VhostUserRequest.GET_CONFIG, "result"],
  [VhostUserRequest.GET_QUEUE_NUM, "data"],
  [VhostUserRequest.GET_MAX_MEM_SLOTS, "data"],
  [VhostUserRequest.GET_STATUS, "data"],
  [VhostUserRequest.GET_INFLIGHT_FD, "data"],
  [VhostUserRequest.SET_DEVICE_STATE_FD, "result"],
  [VhostUserRequest.CHECK_DEVICE_STATE, "result"],
]);

/** Requests the back end always answers (the spec's "reply" column). */
export const ALWAYS_REPLIED_REQUESTS: ReadonlySet<number> = new Set(ALWAYS_REPLIED.keys());

/** Requests whose reply carries data (not a status): a failure cannot be answered. */
export const DATA_REPLY_REQUESTS: ReadonlySet<number> = new Set(
  [...ALWAYS_REPLIED].filter(([, kind]) => kind === "data").map(([id]) => id),
);

// --- names for logs ----------------------------------------------------------------------------

const REQUEST_NAMES: ReadonlyMap<number, string> = new Map(
  Object.entries(VhostUserRequest).map(([name, id]) => [id, name]),
);
const BACKEND_REQUEST_NAMES: ReadonlyMap<number, string> = new Map(
  Object.entries(VhostUserBackendRequest).map(([name, id]) => [id, name]),
);

/** The spec name of a front-end request id without the prefix, e.g. `GET_FEATURES`. */
export function requestName(id: number): string {
  return REQUEST_NAMES.get(id) ?? `UNKNOWN(${id})`;
}

/** The spec name of a back-end request id without the prefix, e.g. `CONFIG_CHANGE_MSG`. */
export function backendRequestName(id: number): string {
  return BACKEND_REQUEST_NAMES.get(id) ?? `UNKNOWN(${id})`;
}

/** Whether `id` is a front-end request id the spec defines. */
export function isKnownRequest(id: number): id is VhostUserRequest {
  return id !== VhostUserRequest.NONE && REQUEST_NAMES.has(id);
}
