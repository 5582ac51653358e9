/**
 * The saved-state format of the vsock device (SET_DEVICE_STATE_FD payload).
 *
 * Layout (little endian):
 *
 *   offset 0   8 bytes  magic "VUVSOCK\0"
 *   offset 8   u32      format version (SNAPSHOT_VERSION)
 *   offset 12  u32      length N of the body
 *   offset 16  N bytes  body: UTF-8 JSON, self-describing (`VsockSnapshot`)
 *   offset 16+N u32     CRC-32 of bytes [0, 16+N)
 *
 * A reader rejects, with a message saying which: a wrong magic, a version newer
 * than it knows, a length that does not match the data, a checksum mismatch,
 * and a body that is not the expected JSON shape. Older versions are upgraded
 * when read (there is only version 1 so far).
 */
import { crc32 } from "./crc32.ts";

export const SNAPSHOT_MAGIC = new TextEncoder().encode("VUVSOCK\0");
export const SNAPSHOT_VERSION = 1;
const HEADER = 16;
/** The JSON body may not exceed this (a real state is a few hundred bytes). */
export const MAX_SNAPSHOT_BODY = 512 * 1024;

/** A connection open at save time (informational: connections do not survive a restore). */
export interface SavedConnection {
  localPort: number;
  peerPort: number;
  hostInitiated: boolean;
}

/** What the device keeps across save/load. */
export interface VsockSnapshot {
  guestCid: number;
  /** acked virtio features, hex */
  features: string;
  /** guest ports host apps have connected to: listeners the driver keeps across a reset */
  guestListenerPorts: number[];
  /** connections open at save time; the driver drops them on TRANSPORT_RESET */
  connections: SavedConnection[];
  /** a transport reset was still owed to the driver at save time */
  transportResetPending: boolean;
  /** the device had not been activated yet (the driver had not read the config) */
  activated: boolean;
  /**
   * the saving front end had handed the event queue to the back end (crosvm); false when
   * the VMM keeps it (QEMU). Absent in states written before this field existed.
   */
  eventQueueOwned?: boolean;
  savedAt: string;
}

export class SnapshotError extends Error {
  override name = "SnapshotError";
}

export function encodeSnapshot(s: VsockSnapshot): Uint8Array {
  const body = new TextEncoder().encode(JSON.stringify(s));
  const out = new Uint8Array(HEADER + body.length + 4);
  const v = new DataView(out.buffer);
  out.set(SNAPSHOT_MAGIC, 0);
  v.setUint32(8, SNAPSHOT_VERSION, true);
  v.setUint32(12, body.length, true);
  out.set(body, HEADER);
  v.setUint32(HEADER + body.length, crc32(out.subarray(0, HEADER + body.length)), true);
  return out;
}

export function decodeSnapshot(bytes: Uint8Array): VsockSnapshot {
  if (bytes.length < HEADER + 4) {
    throw new SnapshotError(`state truncated: ${bytes.length} bytes, need at least ${HEADER + 4}`);
  }
  for (let i = 0; i < SNAPSHOT_MAGIC.length; i++) {
    if (bytes[i] !== SNAPSHOT_MAGIC[i]) {
      throw new SnapshotError("not a vhost-user-vsock state (bad magic)");
    }
  }
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const version = v.getUint32(8, true);
  if (version === 0 || version > SNAPSHOT_VERSION) {
    throw new SnapshotError(
      `state format version ${version} is not supported (this build reads 1..${SNAPSHOT_VERSION})`,
    );
  }
  const len = v.getUint32(12, true);
  if (len > MAX_SNAPSHOT_BODY) throw new SnapshotError(`state body of ${len} bytes is too large`);
  if (HEADER + len + 4 !== bytes.length) {
    throw new SnapshotError(
      `state length mismatch: header says ${len} body bytes, got ${bytes.length - HEADER - 4}`,
    );
  }
  const want = v.getUint32(HEADER + len, true);
  const got = crc32(bytes.subarray(0, HEADER + len));
  if (want !== got) {
    throw new SnapshotError(`state checksum mismatch (stored ${hex(want)}, computed ${hex(got)})`);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(
      new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(HEADER, HEADER + len)),
    );
  } catch (e) {
    throw new SnapshotError(`state body is not JSON: ${e instanceof Error ? e.message : e}`);
  }
  return validate(parsed);
}

function hex(n: number): string {
  return `0x${n.toString(16).padStart(8, "0")}`;
}

function validate(x: unknown): VsockSnapshot {
  const o = x as Record<string, unknown>;
  const fail = (what: string) => {
    throw new SnapshotError(`state body: ${what}`);
  };
  if (typeof o !== "object" || o === null || Array.isArray(o)) fail("not an object");
  const u32 = (n: unknown) =>
    typeof n === "number" && Number.isInteger(n) && n >= 0 && n <= 0xffffffff;
  if (!u32(o.guestCid)) fail("guestCid is not a u32");
  if (typeof o.features !== "string" || !/^[0-9a-f]{1,16}$/.test(o.features)) {
    fail("features is not hex");
  }
  if (!Array.isArray(o.guestListenerPorts) || !o.guestListenerPorts.every(u32)) {
    fail("guestListenerPorts is not a list of ports");
  }
  if (!Array.isArray(o.connections)) fail("connections is not a list");
  for (const c of o.connections as Record<string, unknown>[]) {
    if (
      typeof c !== "object" || c === null || !u32(c.localPort) || !u32(c.peerPort) ||
      typeof c.hostInitiated !== "boolean"
    ) {
      fail("a connection entry is malformed");
    }
  }
  if (typeof o.transportResetPending !== "boolean") fail("transportResetPending is not a boolean");
  if (typeof o.activated !== "boolean") fail("activated is not a boolean");
  if (typeof o.savedAt !== "string") fail("savedAt is not a string");
  if (o.eventQueueOwned !== undefined && typeof o.eventQueueOwned !== "boolean") {
    fail("eventQueueOwned is not a boolean");
  }
  return o as unknown as VsockSnapshot;
}
