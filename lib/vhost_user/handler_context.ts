/**
 * What a front-end request handler of the vhost-user back end sees (the handlers live in
 * `handlers_*.ts`, one file per concern of `docs/interop/vhost-user.rst`: negotiation,
 * memory table, vrings, device config/status/state).
 *
 * A handler gets the decoded payload of one request and a `HandlerContext`: the
 * negotiated state of the current front end (`BackendSession`), the device, guest memory,
 * the vrings, and the back end's ring lifecycle and reply primitives. It returns true when it
 * sent its own reply; `backend.ts` acks the rest (REPLY_ACK) and answers failures, which a
 * handler signals by throwing (`RequestError` for a refused request).
 *
 * Every log line a request can trigger goes through `requestLog`: a front end that repeats
 * a bad request in a loop gets a few lines and a count, not one line per message.
 */

import { LogLimiter } from "../log.ts";
import type { Reactor } from "../reactor.ts";
import type { VirtioDevice } from "./device.ts";
import type { DeviceStateChannel } from "./device_state.ts";
import type { MappedGuestMemory } from "./guest_memory.ts";
import type { RawMessage } from "./message_reader.ts";
import type { Payload, VringState } from "./messages.ts";
import type { Vring } from "./vring.ts";

/**
 * The rate limit of the lines front-end requests trigger (failed requests, refused config
 * reads, memory tables, ring warnings): a VMM's whole realize sequence fits in the burst.
 */
export const requestLog: LogLimiter = new LogLimiter("vhost-user: front-end request lines", 40);

/** Something went wrong handling one request: logged, acked as failure. */
export class RequestError extends Error {}

/** What the current front end negotiated; reset when it goes away. */
export interface BackendSession {
  /** the last SET_FEATURES */
  ackedFeatures: bigint;
  /** the last SET_PROTOCOL_FEATURES, limited to what was offered */
  ackedProtocol: bigint;
  /** whether SET_FEATURES was received */
  featuresSet: boolean;
  /** the last SET_STATUS */
  status: number;
  /** whether SET_OWNER was received */
  owner: boolean;
  /** ring addresses or bases changed across a stop: the driver re-initialized the device */
  driverResetSuspected: boolean;
}

/** A session before any request. */
export function newSession(): BackendSession {
  return {
    ackedFeatures: 0n,
    ackedProtocol: 0n,
    featuresSet: false,
    status: 0,
    owner: false,
    driverResetSuspected: false,
  };
}

/** The back end as its request handlers see it. */
export interface HandlerContext {
  readonly reactor: Reactor;
  readonly device: VirtioDevice;
  readonly memory: MappedGuestMemory;
  readonly vrings: readonly Vring[];
  readonly session: BackendSession;
  readonly stateChannel: DeviceStateChannel;
  /** virtio features offered in GET_FEATURES */
  readonly offeredFeatures: bigint;
  /** protocol features offered in GET_PROTOCOL_FEATURES */
  readonly offeredProtocolFeatures: bigint;

  /** Sends a reply (dropped when no front end is connected). */
  send(bytes: Uint8Array, fds?: number[]): void;
  /** Sends a u64 reply to `request`. */
  replyU64(request: number, value: bigint | number): void;
  /**
   * Stops reading this front end's messages until the returned function is called with the
   * pending reply (sent only if the same front end is still attached).
   */
  holdReplies(): (reply: Uint8Array) => void;
  /** Takes fd #i of the message (the caller owns it now). */
  takeFd(msg: RawMessage, i?: number): number;
  /** The vring `index`, or a RequestError. */
  vring(index: number): Vring;

  /** SET_VRING_KICK: the ring starts (after a driver reset check). */
  startRing(v: Vring): void;
  /**
   * GET_VRING_BASE: stops the ring; returns its position (`VirtQueue.ringBase`: the next
   * avail index of a split ring, `packedRingBase` of a packed one).
   */
  stopRing(v: Vring): number;
  /** (Re)creates a started ring's queue (split or packed) from its addresses. */
  rebuildQueue(v: Vring): void;
  /** Rebuilds every started ring (memory or features changed). */
  rebuildQueues(): void;
  /** Activates or deactivates the ring to match started && enabled && mapped. */
  updateActive(v: Vring): void;
  deactivateAll(): void;
  /** RESET_OWNER / RESET_DEVICE. */
  resetDevice(why: string): void;
  /** Whether no ring is started (the device is suspended). */
  allStopped(): boolean;
  /** A kick on the ring's eventfd. */
  onKick(v: Vring): void;
}

/** Handles one decoded request; returns true if it sent its own reply. */
export type Handler = (ctx: HandlerContext, msg: RawMessage, p: Payload) => boolean;

/** The u64 payload, or a RequestError. */
export function u64(p: Payload): bigint {
  if (p.kind !== "u64") throw new RequestError("bad payload");
  return p.value;
}

/** The vring state payload, or a RequestError. */
export function vringState(p: Payload): VringState {
  if (p.kind !== "vringState") throw new RequestError("bad payload");
  return p.value;
}
