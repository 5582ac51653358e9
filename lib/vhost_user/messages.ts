/**
 * vhost-user message codec: the 12-byte header and every payload layout of
 * `docs/interop/vhost-user.rst` ("Payload"), pure functions over bytes, no I/O.
 *
 * Messages arrive whole (the connection reads the header, checks `size` against
 * `expectedPayloadSize`, then reads exactly `size` bytes), so there is no stream reassembly here.
 * All numbers are in the machine's native byte order, as the spec says.
 *
 * Error style: decoders never throw. Each returns the decoded value or a `CodecError`
 * (test with `instanceof CodecError`), whatever bytes it is given. Encoders are fed by our own
 * code (the back end's replies, the testing front end) and throw `CodecError` when a value
 * cannot be represented (a negative length, nine memory regions, ...).
 *
 * 64-bit fields come in two flavours:
 * - `bigint` where the value is a bit mask or opaque to the back end: virtio and protocol
 *   features, the generic u64 payload, the vring `log` guest address (only meaningful when
 *   `VHOST_VRING_F_LOG` is set, so it must not be range-checked when it is not).
 * - `number` where the back end does arithmetic on it: memory region guest address, size, user
 *   address and mmap offset, ring user addresses, log and inflight mmap size/offset. These are
 *   read as two u32 halves; a value >= 2^53 is a `CodecError` ("out of range"), and so is a
 *   region or area whose end (`addr + size`) would pass 2^53, so every sum the back end forms
 *   from a decoded region is exact.
 *
 * Decoded objects never alias the input bytes (config payloads and opaque bytes are copied), so
 * the caller may reuse its receive buffer at once.
 */

import {
  requestName,
  VHOST_MEMORY_BASELINE_NREGIONS,
  VHOST_USER_CONFIG_HDR_SIZE,
  VHOST_USER_FLAGS_KNOWN_MASK,
  VHOST_USER_HDR_SIZE,
  VHOST_USER_MAX_CONFIG_SIZE,
  VHOST_USER_MAX_PAYLOAD_SIZE,
  VHOST_USER_MEMORY_HDR_SIZE,
  VHOST_USER_MEMORY_REGION_SIZE,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_REPLY_MASK,
  VHOST_USER_SINGLE_MEMORY_REGION_SIZE,
  VHOST_USER_VERSION,
  VHOST_USER_VERSION_MASK,
  VHOST_USER_VRING_IDX_MASK,
  VHOST_USER_VRING_NOFD_MASK,
  VhostUserRequest,
} from "./protocol.ts";

/** A malformed or unrepresentable message. The only error this module produces. */
export class CodecError extends Error {
  override name = "CodecError";
}

// --- types -------------------------------------------------------------------------------------

export interface VhostUserHeader {
  request: number;
  flags: number;
  size: number;
}

/** "A vring state description": SET_VRING_NUM/BASE/ENABLE/ENDIAN, GET_VRING_BASE, VRING_KICK. */
export interface VringState {
  index: number;
  num: number;
}

/** "A vring address description" (SET_VRING_ADDR). Ring addresses are front-end user addresses. */
export interface VringAddr {
  index: number;
  flags: number;
  descUser: number;
  usedUser: number;
  availUser: number;
  logGuestAddr: bigint;
}

/** The u64 of SET_VRING_KICK/CALL/ERR: bits 0-7 vring index, bit 8 "no fd, poll". */
export interface VringFd {
  index: number;
  noFd: boolean;
}

/** "Memory region description". */
export interface MemoryRegion {
  guestAddr: number;
  size: number;
  userAddr: number;
  mmapOffset: number;
}

/** "Multiple memory regions description" (SET_MEM_TABLE), at most 8 regions. */
export interface MemoryTable {
  regions: MemoryRegion[];
}

/** "Log description" (SET_LOG_BASE). */
export interface VhostUserLog {
  mmapSize: number;
  mmapOffset: number;
}

/** "Virtio device config space" (GET_CONFIG request and reply, SET_CONFIG). */
export interface VhostUserConfig {
  offset: number;
  /** the access size; always equals `payload.length` */
  size: number;
  flags: number;
  payload: Uint8Array;
}

/** "Inflight description" (GET/SET_INFLIGHT_FD). */
export interface VhostUserInflight {
  mmapSize: number;
  mmapOffset: number;
  numQueues: number;
  queueSize: number;
}

/** "Device state transfer parameters" (SET_DEVICE_STATE_FD); values are checked by the caller. */
export interface DeviceStateTransfer {
  direction: number;
  phase: number;
}

/** A decoded request payload, tagged with its layout. */
export type Payload =
  | { kind: "none" }
  | { kind: "u64"; value: bigint }
  | { kind: "status"; value: number }
  | { kind: "vringState"; value: VringState }
  | { kind: "vringAddr"; value: VringAddr }
  | { kind: "vringFd"; value: VringFd }
  | { kind: "memTable"; value: MemoryTable }
  | { kind: "memRegion"; value: MemoryRegion }
  | { kind: "log"; value: VhostUserLog }
  | { kind: "config"; value: VhostUserConfig }
  | { kind: "inflight"; value: VhostUserInflight }
  | { kind: "deviceState"; value: DeviceStateTransfer }
  /** layouts of features this back end never offers (IOTLB, crypto, shared objects) */
  | { kind: "opaque"; value: Uint8Array };
export type PayloadKind = Payload["kind"];

/** Allowed payload sizes of a request, inclusive. */
export interface PayloadSize {
  readonly min: number;
  readonly max: number;
}

// --- sizes -------------------------------------------------------------------------------------

const U64_SIZE = 8;
const VRING_STATE_SIZE = 8;
const VRING_ADDR_SIZE = 40;
const LOG_SIZE = 16;
/** u64, u64, u16, u16 plus 4 bytes of implicit tail padding (QEMU's and rust-vmm's layout). */
const INFLIGHT_SIZE = 24;
const DEVICE_STATE_SIZE = 8;
/** `struct vhost_iotlb_msg`: 3 x u64, u8 perm, u8 type, padded to 32. */
const IOTLB_MSG_SIZE = 32;
/** `struct VhostUserShared`: a 16-byte UUID. */
const SHARED_OBJECT_SIZE = 16;

/** Addresses and sizes the back end computes with must stay below this (exact doubles). */
const ADDRESS_LIMIT = 2 ** 53;
const ADDRESS_LIMIT_HI = ADDRESS_LIMIT / 2 ** 32;

interface PayloadSpec extends PayloadSize {
  readonly kind: PayloadKind;
}

function spec(kind: PayloadKind, min: number, max = min): PayloadSpec {
  return { kind, min, max };
}

const NONE = spec("none", 0);
const U64 = spec("u64", U64_SIZE);
const STATE = spec("vringState", VRING_STATE_SIZE);
const FD = spec("vringFd", U64_SIZE);
const CONFIG = spec(
  "config",
  VHOST_USER_CONFIG_HDR_SIZE,
  VHOST_USER_CONFIG_HDR_SIZE + VHOST_USER_MAX_CONFIG_SIZE,
);
const INFLIGHT = spec("inflight", INFLIGHT_SIZE);
const MEM_REGION = spec("memRegion", VHOST_USER_SINGLE_MEMORY_REGION_SIZE);

const R = VhostUserRequest;
/** Request payload layout and size bounds for each front-end request the spec defines. */
const PAYLOAD_SPECS: ReadonlyMap<number, PayloadSpec> = new Map<number, PayloadSpec>([
  [R.GET_FEATURES, NONE],
  [R.SET_FEATURES, U64],
  [R.SET_OWNER, NONE],
  [R.RESET_OWNER, NONE],
  [
    R.SET_MEM_TABLE,
    spec(
      "memTable",
      VHOST_USER_MEMORY_HDR_SIZE,
      VHOST_USER_MEMORY_HDR_SIZE + VHOST_MEMORY_BASELINE_NREGIONS * VHOST_USER_MEMORY_REGION_SIZE,
    ),
  ],
  // The spec's table says u64, but every front end sends the 16-byte log description.
  [R.SET_LOG_BASE, spec("log", LOG_SIZE)],
  [R.SET_LOG_FD, NONE],
  [R.SET_VRING_NUM, STATE],
  [R.SET_VRING_ADDR, spec("vringAddr", VRING_ADDR_SIZE)],
  [R.SET_VRING_BASE, STATE],
  [R.GET_VRING_BASE, STATE],
  [R.SET_VRING_KICK, FD],
  [R.SET_VRING_CALL, FD],
  [R.SET_VRING_ERR, FD],
  [R.GET_PROTOCOL_FEATURES, NONE],
  [R.SET_PROTOCOL_FEATURES, U64],
  [R.GET_QUEUE_NUM, NONE],
  [R.SET_VRING_ENABLE, STATE],
  [R.SEND_RARP, U64],
  [R.NET_SET_MTU, U64],
  [R.SET_BACKEND_REQ_FD, NONE],
  [R.IOTLB_MSG, spec("opaque", IOTLB_MSG_SIZE)],
  [R.SET_VRING_ENDIAN, STATE],
  [R.GET_CONFIG, CONFIG],
  [R.SET_CONFIG, CONFIG],
  [R.CREATE_CRYPTO_SESSION, spec("opaque", 0, VHOST_USER_MAX_PAYLOAD_SIZE)],
  [R.CLOSE_CRYPTO_SESSION, U64],
  [R.POSTCOPY_ADVISE, NONE],
  [R.POSTCOPY_LISTEN, NONE],
  [R.POSTCOPY_END, NONE],
  [R.GET_INFLIGHT_FD, INFLIGHT],
  [R.SET_INFLIGHT_FD, INFLIGHT],
  [R.GPU_SET_SOCKET, NONE],
  [R.RESET_DEVICE, NONE],
  [R.VRING_KICK, STATE],
  [R.GET_MAX_MEM_SLOTS, NONE],
  [R.ADD_MEM_REG, MEM_REGION],
  [R.REM_MEM_REG, MEM_REGION],
  [R.SET_STATUS, spec("status", U64_SIZE)],
  [R.GET_STATUS, NONE],
  [R.GET_SHARED_OBJECT, spec("opaque", SHARED_OBJECT_SIZE)],
  [R.SET_DEVICE_STATE_FD, spec("deviceState", DEVICE_STATE_SIZE)],
  [R.CHECK_DEVICE_STATE, NONE],
]);

const ANY_SIZE: PayloadSize = { min: 0, max: VHOST_USER_MAX_PAYLOAD_SIZE };

/**
 * The payload sizes a front-end request may carry. For an id the spec does not define this is
 * `{0, VHOST_USER_MAX_PAYLOAD_SIZE}`, so the connection can still read (and refuse) it.
 */
export function expectedPayloadSize(request: number): PayloadSize {
  return PAYLOAD_SPECS.get(request) ?? ANY_SIZE;
}

/** The layout of a request's payload, or undefined for an id the spec does not define. */
export function payloadKind(request: number): PayloadKind | undefined {
  return PAYLOAD_SPECS.get(request)?.kind;
}

// --- byte access ---------------------------------------------------------------------------------

/** The spec's "native byte order". */
const LE = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
/** Offsets of the low and high u32 halves inside a u64. */
const LO = LE ? 0 : 4;
const HI = LE ? 4 : 0;

function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** Runs a decoder that signals malformed input by throwing CodecError; returns it instead. */
function decoding<T>(fn: () => T): T | CodecError {
  try {
    return fn();
  } catch (e) {
    if (e instanceof CodecError) return e;
    throw e;
  }
}

function expectLength(bytes: Uint8Array, size: number, what: string): DataView {
  if (bytes.length !== size) {
    throw new CodecError(`${what}: payload of ${bytes.length} bytes, expected ${size}`);
  }
  return viewOf(bytes);
}

/** A u64 the back end computes with: two u32 halves, rejected when >= 2^53. */
function getAddr(v: DataView, off: number, what: string): number {
  const hi = v.getUint32(off + HI, LE);
  if (hi >= ADDRESS_LIMIT_HI) throw new CodecError(`${what}: address out of range (>= 2^53)`);
  return hi * 2 ** 32 + v.getUint32(off + LO, LE);
}

/** `base + size` must not pass 2^53 (both are already below it, so the subtraction is exact). */
function checkEnd(base: number, size: number, what: string): void {
  if (size > ADDRESS_LIMIT - base) throw new CodecError(`${what}: end out of range (> 2^53)`);
}

function checkU(value: number, bits: 8 | 16 | 32, what: string): number {
  if (!Number.isInteger(value) || value < 0 || value >= 2 ** bits) {
    throw new CodecError(`${what}: ${value} is not a u${bits}`);
  }
  return value;
}

function putAddr(v: DataView, off: number, value: number, what: string): void {
  if (!Number.isInteger(value) || value < 0 || value >= ADDRESS_LIMIT) {
    throw new CodecError(`${what}: ${value} is not an integer in [0, 2^53)`);
  }
  v.setUint32(off + LO, value % 2 ** 32, LE);
  v.setUint32(off + HI, Math.floor(value / 2 ** 32), LE);
}

function toU64(value: bigint | number, what: string): bigint {
  const big = typeof value === "bigint"
    ? value
    : Number.isSafeInteger(value)
    ? BigInt(value)
    : undefined;
  if (big === undefined || big < 0n || big >= 1n << 64n) {
    throw new CodecError(`${what}: ${value} is not a u64`);
  }
  return big;
}

// --- header --------------------------------------------------------------------------------------

/**
 * Reads the header at `buf[off..off+12)`. Rejects a version other than 1, flag bits the spec
 * does not define, and a size above `VHOST_USER_MAX_PAYLOAD_SIZE`. The request id is not
 * checked (an unknown id gets a refusal, not a dropped connection).
 */
export function decodeHeader(buf: Uint8Array, off = 0): VhostUserHeader | CodecError {
  if (!Number.isInteger(off) || off < 0 || off > buf.length - VHOST_USER_HDR_SIZE) {
    return new CodecError(`header: ${buf.length} bytes, no 12-byte header at offset ${off}`);
  }
  const v = new DataView(buf.buffer, buf.byteOffset + off, VHOST_USER_HDR_SIZE);
  const request = v.getUint32(0, LE);
  const flags = v.getUint32(4, LE);
  const size = v.getUint32(8, LE);
  if ((flags & VHOST_USER_VERSION_MASK) !== VHOST_USER_VERSION) {
    return new CodecError(`header: unsupported version ${flags & VHOST_USER_VERSION_MASK}`);
  }
  if ((flags & ~VHOST_USER_FLAGS_KNOWN_MASK) !== 0) {
    return new CodecError(`header: unknown flag bits 0x${(flags >>> 0).toString(16)}`);
  }
  if (size > VHOST_USER_MAX_PAYLOAD_SIZE) {
    return new CodecError(`header: payload size ${size} > ${VHOST_USER_MAX_PAYLOAD_SIZE}`);
  }
  return { request, flags, size };
}

/** Writes a header into `out` at `off` (a fresh 12-byte array by default) and returns `out`. */
export function encodeHeader(
  header: VhostUserHeader,
  out: Uint8Array = new Uint8Array(VHOST_USER_HDR_SIZE),
  off = 0,
): Uint8Array {
  if (!Number.isInteger(off) || off < 0 || off > out.length - VHOST_USER_HDR_SIZE) {
    throw new CodecError(`header: no room for 12 bytes at offset ${off} of ${out.length}`);
  }
  if (checkU(header.size, 32, "header size") > VHOST_USER_MAX_PAYLOAD_SIZE) {
    throw new CodecError(`header: payload size ${header.size} > ${VHOST_USER_MAX_PAYLOAD_SIZE}`);
  }
  const v = new DataView(out.buffer, out.byteOffset + off, VHOST_USER_HDR_SIZE);
  v.setUint32(0, checkU(header.request, 32, "header request"), LE);
  v.setUint32(4, checkU(header.flags, 32, "header flags"), LE);
  v.setUint32(8, header.size, LE);
  return out;
}

/** Whether a decoded header has the REPLY flag. */
export function isReply(flags: number): boolean {
  return (flags & VHOST_USER_REPLY_MASK) !== 0;
}

/** Whether a decoded header asks for a REPLY_ACK u64. */
export function needsReply(flags: number): boolean {
  return (flags & VHOST_USER_NEED_REPLY_MASK) !== 0;
}

// --- payload decoders ----------------------------------------------------------------------------

/** A single 64-bit integer (features, protocol features, u64 replies). */
export function decodeU64(payload: Uint8Array): bigint | CodecError {
  return decoding(() => expectLength(payload, U64_SIZE, "u64").getBigUint64(0, LE));
}

/** SET_STATUS: a virtio device status byte carried in a u64. */
export function decodeStatus(payload: Uint8Array): number | CodecError {
  return decoding(() => {
    const v = expectLength(payload, U64_SIZE, "status");
    const lo = v.getUint32(LO, LE);
    if (v.getUint32(HI, LE) !== 0 || lo > 0xff) {
      throw new CodecError(`status: value does not fit in a u8`);
    }
    return lo;
  });
}

export function decodeVringState(payload: Uint8Array): VringState | CodecError {
  return decoding(() => {
    const v = expectLength(payload, VRING_STATE_SIZE, "vring state");
    return { index: v.getUint32(0, LE), num: v.getUint32(4, LE) };
  });
}

export function decodeVringAddr(payload: Uint8Array): VringAddr | CodecError {
  return decoding(() => {
    const v = expectLength(payload, VRING_ADDR_SIZE, "vring addr");
    return {
      index: v.getUint32(0, LE),
      flags: v.getUint32(4, LE),
      descUser: getAddr(v, 8, "vring addr descriptor"),
      usedUser: getAddr(v, 16, "vring addr used"),
      availUser: getAddr(v, 24, "vring addr available"),
      logGuestAddr: v.getBigUint64(32, LE),
    };
  });
}

/** SET_VRING_KICK/CALL/ERR. Bits above 8 are reserved and rejected. */
export function decodeVringFd(payload: Uint8Array): VringFd | CodecError {
  return decoding(() => {
    const v = expectLength(payload, U64_SIZE, "vring fd");
    const lo = v.getUint32(LO, LE);
    if (
      v.getUint32(HI, LE) !== 0 ||
      (lo & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK)) !== 0
    ) {
      throw new CodecError("vring fd: reserved bits set");
    }
    return { index: lo & VHOST_USER_VRING_IDX_MASK, noFd: (lo & VHOST_USER_VRING_NOFD_MASK) !== 0 };
  });
}

function getRegion(v: DataView, off: number, what: string): MemoryRegion {
  const region = {
    guestAddr: getAddr(v, off, `${what} guest address`),
    size: getAddr(v, off + 8, `${what} size`),
    userAddr: getAddr(v, off + 16, `${what} user address`),
    mmapOffset: getAddr(v, off + 24, `${what} mmap offset`),
  };
  checkEnd(region.guestAddr, region.size, `${what} guest address`);
  checkEnd(region.userAddr, region.size, `${what} user address`);
  checkEnd(region.mmapOffset, region.size, `${what} mmap offset`);
  return region;
}

/** SET_MEM_TABLE: `nregions` <= 8 and exactly `8 + nregions * 32` bytes. */
export function decodeMemoryTable(payload: Uint8Array): MemoryTable | CodecError {
  return decoding(() => {
    if (payload.length < VHOST_USER_MEMORY_HDR_SIZE) {
      throw new CodecError(`memory table: payload of ${payload.length} bytes, too short`);
    }
    const v = viewOf(payload);
    const n = v.getUint32(0, LE);
    if (n > VHOST_MEMORY_BASELINE_NREGIONS) {
      throw new CodecError(`memory table: ${n} regions > ${VHOST_MEMORY_BASELINE_NREGIONS}`);
    }
    expectLength(
      payload,
      VHOST_USER_MEMORY_HDR_SIZE + n * VHOST_USER_MEMORY_REGION_SIZE,
      `memory table of ${n} regions`,
    );
    const regions: MemoryRegion[] = [];
    for (let i = 0; i < n; i++) {
      regions.push(
        getRegion(
          v,
          VHOST_USER_MEMORY_HDR_SIZE + i * VHOST_USER_MEMORY_REGION_SIZE,
          `memory region ${i}`,
        ),
      );
    }
    return { regions };
  });
}

/** ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region. */
export function decodeSingleMemoryRegion(payload: Uint8Array): MemoryRegion | CodecError {
  return decoding(() => {
    const v = expectLength(payload, VHOST_USER_SINGLE_MEMORY_REGION_SIZE, "memory region");
    return getRegion(v, 8, "memory region");
  });
}

/** SET_LOG_BASE. */
export function decodeLog(payload: Uint8Array): VhostUserLog | CodecError {
  return decoding(() => {
    const v = expectLength(payload, LOG_SIZE, "log");
    const log = { mmapSize: getAddr(v, 0, "log size"), mmapOffset: getAddr(v, 8, "log offset") };
    checkEnd(log.mmapOffset, log.mmapSize, "log area");
    return log;
  });
}

/** GET_CONFIG / SET_CONFIG: exactly `12 + size` bytes, and `offset + size` <= 256. */
export function decodeConfig(payload: Uint8Array): VhostUserConfig | CodecError {
  return decoding(() => {
    if (payload.length < VHOST_USER_CONFIG_HDR_SIZE) {
      throw new CodecError(`config: payload of ${payload.length} bytes, too short`);
    }
    const v = viewOf(payload);
    const offset = v.getUint32(0, LE);
    const size = v.getUint32(4, LE);
    const flags = v.getUint32(8, LE);
    if (offset > VHOST_USER_MAX_CONFIG_SIZE || size > VHOST_USER_MAX_CONFIG_SIZE - offset) {
      throw new CodecError(
        `config: access [${offset}, +${size}) beyond ${VHOST_USER_MAX_CONFIG_SIZE} bytes`,
      );
    }
    expectLength(payload, VHOST_USER_CONFIG_HDR_SIZE + size, `config of ${size} bytes`);
    return { offset, size, flags, payload: payload.slice(VHOST_USER_CONFIG_HDR_SIZE) };
  });
}

/** GET_INFLIGHT_FD / SET_INFLIGHT_FD. */
export function decodeInflight(payload: Uint8Array): VhostUserInflight | CodecError {
  return decoding(() => {
    const v = expectLength(payload, INFLIGHT_SIZE, "inflight");
    const inflight = {
      mmapSize: getAddr(v, 0, "inflight mmap size"),
      mmapOffset: getAddr(v, 8, "inflight mmap offset"),
      numQueues: v.getUint16(16, LE),
      queueSize: v.getUint16(18, LE),
    };
    checkEnd(inflight.mmapOffset, inflight.mmapSize, "inflight area");
    return inflight;
  });
}

/** SET_DEVICE_STATE_FD. */
export function decodeDeviceState(payload: Uint8Array): DeviceStateTransfer | CodecError {
  return decoding(() => {
    const v = expectLength(payload, DEVICE_STATE_SIZE, "device state");
    return { direction: v.getUint32(0, LE), phase: v.getUint32(4, LE) };
  });
}

/**
 * Decodes the payload of front-end request `request`. Never throws: an unknown request id, a
 * size outside `expectedPayloadSize(request)` or a malformed layout is a `CodecError`.
 */
export function decodePayload(request: number, payload: Uint8Array): Payload | CodecError {
  const s = PAYLOAD_SPECS.get(request);
  if (s === undefined) return new CodecError(`unknown request ${request}`);
  if (payload.length < s.min || payload.length > s.max) {
    const expected = s.min === s.max ? `${s.min}` : `${s.min}..${s.max}`;
    return new CodecError(
      `${requestName(request)}: payload of ${payload.length} bytes, expected ${expected}`,
    );
  }
  const result = decodeKind(s.kind, payload);
  return result instanceof CodecError
    ? new CodecError(`${requestName(request)}: ${result.message}`)
    : result;
}

function tagged<K extends PayloadKind, T>(
  kind: K,
  value: T | CodecError,
): { kind: K; value: T } | CodecError {
  return value instanceof CodecError ? value : { kind, value };
}

function decodeKind(kind: PayloadKind, payload: Uint8Array): Payload | CodecError {
  switch (kind) {
    case "none":
      return { kind };
    case "u64":
      return tagged(kind, decodeU64(payload));
    case "status":
      return tagged(kind, decodeStatus(payload));
    case "vringState":
      return tagged(kind, decodeVringState(payload));
    case "vringAddr":
      return tagged(kind, decodeVringAddr(payload));
    case "vringFd":
      return tagged(kind, decodeVringFd(payload));
    case "memTable":
      return tagged(kind, decodeMemoryTable(payload));
    case "memRegion":
      return tagged(kind, decodeSingleMemoryRegion(payload));
    case "log":
      return tagged(kind, decodeLog(payload));
    case "config":
      return tagged(kind, decodeConfig(payload));
    case "inflight":
      return tagged(kind, decodeInflight(payload));
    case "deviceState":
      return tagged(kind, decodeDeviceState(payload));
    case "opaque":
      return { kind, value: payload.slice() };
  }
}

// --- payload encoders ----------------------------------------------------------------------------

const EMPTY = new Uint8Array(0);

function alloc(size: number): [Uint8Array, DataView] {
  const bytes = new Uint8Array(size);
  return [bytes, new DataView(bytes.buffer)];
}

export function encodeU64(value: bigint | number): Uint8Array {
  const [bytes, v] = alloc(U64_SIZE);
  v.setBigUint64(0, toU64(value, "u64"), LE);
  return bytes;
}

export function encodeStatus(status: number): Uint8Array {
  return encodeU64(checkU(status, 8, "status"));
}

export function encodeVringState(state: VringState): Uint8Array {
  const [bytes, v] = alloc(VRING_STATE_SIZE);
  v.setUint32(0, checkU(state.index, 32, "vring state index"), LE);
  v.setUint32(4, checkU(state.num, 32, "vring state num"), LE);
  return bytes;
}

export function encodeVringAddr(addr: VringAddr): Uint8Array {
  const [bytes, v] = alloc(VRING_ADDR_SIZE);
  v.setUint32(0, checkU(addr.index, 32, "vring addr index"), LE);
  v.setUint32(4, checkU(addr.flags, 32, "vring addr flags"), LE);
  putAddr(v, 8, addr.descUser, "vring addr descriptor");
  putAddr(v, 16, addr.usedUser, "vring addr used");
  putAddr(v, 24, addr.availUser, "vring addr available");
  v.setBigUint64(32, toU64(addr.logGuestAddr, "vring addr log"), LE);
  return bytes;
}

export function encodeVringFd(fd: VringFd): Uint8Array {
  const index = checkU(fd.index, 8, "vring fd index");
  return encodeU64(fd.noFd ? index | VHOST_USER_VRING_NOFD_MASK : index);
}

function putRegion(v: DataView, off: number, r: MemoryRegion, what: string): void {
  putAddr(v, off, r.guestAddr, `${what} guest address`);
  putAddr(v, off + 8, r.size, `${what} size`);
  putAddr(v, off + 16, r.userAddr, `${what} user address`);
  putAddr(v, off + 24, r.mmapOffset, `${what} mmap offset`);
}

export function encodeMemoryTable(table: MemoryTable): Uint8Array {
  const n = table.regions.length;
  if (n > VHOST_MEMORY_BASELINE_NREGIONS) {
    throw new CodecError(`memory table: ${n} regions > ${VHOST_MEMORY_BASELINE_NREGIONS}`);
  }
  const [bytes, v] = alloc(VHOST_USER_MEMORY_HDR_SIZE + n * VHOST_USER_MEMORY_REGION_SIZE);
  v.setUint32(0, n, LE);
  table.regions.forEach((r, i) =>
    putRegion(
      v,
      VHOST_USER_MEMORY_HDR_SIZE + i * VHOST_USER_MEMORY_REGION_SIZE,
      r,
      `memory region ${i}`,
    )
  );
  return bytes;
}

export function encodeSingleMemoryRegion(region: MemoryRegion): Uint8Array {
  const [bytes, v] = alloc(VHOST_USER_SINGLE_MEMORY_REGION_SIZE);
  putRegion(v, 8, region, "memory region");
  return bytes;
}

export function encodeLog(log: VhostUserLog): Uint8Array {
  const [bytes, v] = alloc(LOG_SIZE);
  putAddr(v, 0, log.mmapSize, "log size");
  putAddr(v, 8, log.mmapOffset, "log offset");
  return bytes;
}

/** Config access; `size` must equal `payload.length` and `offset + size` <= 256. */
export function encodeConfig(config: VhostUserConfig): Uint8Array {
  const { offset, size, flags, payload } = config;
  checkU(offset, 32, "config offset");
  checkU(flags, 32, "config flags");
  if (size !== payload.length) {
    throw new CodecError(`config: size ${size} but ${payload.length} payload bytes`);
  }
  if (offset + size > VHOST_USER_MAX_CONFIG_SIZE) {
    throw new CodecError(
      `config: access [${offset}, +${size}) beyond ${VHOST_USER_MAX_CONFIG_SIZE} bytes`,
    );
  }
  const [bytes, v] = alloc(VHOST_USER_CONFIG_HDR_SIZE + size);
  v.setUint32(0, offset, LE);
  v.setUint32(4, size, LE);
  v.setUint32(8, flags, LE);
  bytes.set(payload, VHOST_USER_CONFIG_HDR_SIZE);
  return bytes;
}

export function encodeInflight(inflight: VhostUserInflight): Uint8Array {
  const [bytes, v] = alloc(INFLIGHT_SIZE);
  putAddr(v, 0, inflight.mmapSize, "inflight mmap size");
  putAddr(v, 8, inflight.mmapOffset, "inflight mmap offset");
  v.setUint16(16, checkU(inflight.numQueues, 16, "inflight num queues"), LE);
  v.setUint16(18, checkU(inflight.queueSize, 16, "inflight queue size"), LE);
  return bytes;
}

export function encodeDeviceState(state: DeviceStateTransfer): Uint8Array {
  const [bytes, v] = alloc(DEVICE_STATE_SIZE);
  v.setUint32(0, checkU(state.direction, 32, "device state direction"), LE);
  v.setUint32(4, checkU(state.phase, 32, "device state phase"), LE);
  return bytes;
}

/** The inverse of `decodePayload`. */
export function encodePayload(payload: Payload): Uint8Array {
  switch (payload.kind) {
    case "none":
      return EMPTY;
    case "u64":
      return encodeU64(payload.value);
    case "status":
      return encodeStatus(payload.value);
    case "vringState":
      return encodeVringState(payload.value);
    case "vringAddr":
      return encodeVringAddr(payload.value);
    case "vringFd":
      return encodeVringFd(payload.value);
    case "memTable":
      return encodeMemoryTable(payload.value);
    case "memRegion":
      return encodeSingleMemoryRegion(payload.value);
    case "log":
      return encodeLog(payload.value);
    case "config":
      return encodeConfig(payload.value);
    case "inflight":
      return encodeInflight(payload.value);
    case "deviceState":
      return encodeDeviceState(payload.value);
    case "opaque":
      return payload.value.slice();
  }
}

// --- whole messages ------------------------------------------------------------------------------

/** Header + payload in one buffer, ready for one `sendmsg`. */
export function encodeMessage(
  request: number,
  flags: number,
  payload: Uint8Array = EMPTY,
): Uint8Array {
  const out = new Uint8Array(VHOST_USER_HDR_SIZE + payload.length);
  encodeHeader({ request, flags, size: payload.length }, out);
  out.set(payload, VHOST_USER_HDR_SIZE);
  return out;
}

/** The header flags of a front-end request: VERSION, and NEED_REPLY when `needReply`. */
export function requestFlags(needReply = false): number {
  return VHOST_USER_VERSION | (needReply ? VHOST_USER_NEED_REPLY_MASK : 0);
}

/** A front-end request; `needReply` sets NEED_REPLY (only meaningful with REPLY_ACK). */
export function encodeRequest(
  request: number,
  payload: Uint8Array = EMPTY,
  needReply = false,
): Uint8Array {
  return encodeMessage(request, requestFlags(needReply), payload);
}

/** A back-end reply to `request`: VERSION | REPLY. */
export function encodeReply(request: number, payload: Uint8Array = EMPTY): Uint8Array {
  return encodeMessage(request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, payload);
}

/** u64 reply: GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, REPLY_ACK (0 = success), ... */
export function encodeU64Reply(request: number, value: bigint | number): Uint8Array {
  return encodeReply(request, encodeU64(value));
}

/** Vring state reply (GET_VRING_BASE). */
export function encodeVringStateReply(request: number, state: VringState): Uint8Array {
  return encodeReply(request, encodeVringState(state));
}

/** GET_CONFIG reply; `null` sends the empty payload that signals failure. */
export function encodeConfigReply(config: VhostUserConfig | null): Uint8Array {
  return encodeReply(VhostUserRequest.GET_CONFIG, config === null ? EMPTY : encodeConfig(config));
}
