/**
 * Vring set-up and lifecycle requests of the vhost-user back end
 * (`docs/interop/vhost-user.rst`, "Ring states"): SET_VRING_NUM, SET_VRING_ADDR,
 * SET_VRING_BASE, SET_VRING_KICK (starts the ring), GET_VRING_BASE (stops it),
 * SET_VRING_CALL, SET_VRING_ERR, SET_VRING_ENABLE and the in-band VRING_KICK.
 *
 * A kick that arrives while the ring is not active is remembered ("never drop a kick"), and
 * a ring that becomes active is processed at once ("kick after start"); see `backend.ts`.
 *
 * Kick, call and error fds must be eventfds, as the spec names them: anything else (a memfd
 * cannot be polled, a pipe's read end or a dead socket fails every interrupt write) is
 * refused and closed, leaving the ring as it was.
 */

import { close, EPOLLET, EPOLLIN } from "../../ffi/mod.ts";
import { log } from "../log.ts";
import { VIRTIO_F_RING_PACKED_MASK } from "../virtio/features.ts";
import {
  type Handler,
  type HandlerContext,
  RequestError,
  requestLog,
  vringState,
} from "./handler_context.ts";
import type { RawMessage } from "./message_reader.ts";
import { encodeVringStateReply } from "./messages.ts";
import {
  VHOST_USER_F_PROTOCOL_FEATURES_MASK as PROTOCOL_FEATURES_MASK,
  VhostUserRequest as R,
} from "./protocol.ts";

/** What /proc/self/fd/<n> links to for an eventfd. */
const EVENTFD_LINK = "anon_inode:[eventfd]";

/** Takes the message's fd if it is an eventfd; closes it and refuses otherwise. */
function takeEventFd(ctx: HandlerContext, msg: RawMessage, what: string): number {
  const fd = ctx.takeFd(msg);
  let link = "";
  try {
    link = Deno.readLinkSync(`/proc/self/fd/${fd}`);
  } catch { /* not inspectable: refused below */ }
  if (link !== EVENTFD_LINK) {
    close(fd);
    throw new RequestError(`${what} fd is not an eventfd (${link || "unknown"})`);
  }
  return fd;
}

/** Whether the driver negotiated packed rings (VIRTIO_F_RING_PACKED). */
function isPacked(ctx: HandlerContext): boolean {
  return (ctx.session.ackedFeatures & VIRTIO_F_RING_PACKED_MASK) !== 0n;
}

/** Handlers of the vring requests, by request id. */
export const VRING_HANDLERS: ReadonlyMap<number, Handler> = new Map<number, Handler>([
  [R.SET_VRING_NUM, (ctx, _msg, p) => {
    const { index, num } = vringState(p);
    const v = ctx.vring(index);
    const max = ctx.device.maxQueueSize;
    // A packed ring's size need not be a power of 2 (virtio 1.3, "Packed Virtqueues").
    if (isPacked(ctx)) {
      if (num === 0 || num > max) {
        throw new RequestError(`vring ${index}: size ${num} not in 1..${max}`);
      }
    } else if (num === 0 || num > max || (num & (num - 1)) !== 0) {
      throw new RequestError(`vring ${index}: size ${num} is not a power of 2 <= ${max}`);
    }
    v.num = num;
    return false;
  }],
  [R.SET_VRING_ADDR, (ctx, _msg, p) => {
    if (p.kind !== "vringAddr") throw new RequestError("bad payload");
    const a = p.value;
    const v = ctx.vring(a.index);
    v.descUser = a.descUser;
    v.availUser = a.availUser;
    v.usedUser = a.usedUser;
    v.addrFlags = a.flags;
    v.logGuestAddr = a.logGuestAddr;
    v.hasAddr = true;
    ctx.device.queueConfigured?.(v.index);
    if (v.stoppedAddr !== null && v.stoppedAddr !== v.addrKey()) {
      ctx.session.driverResetSuspected = true;
    }
    if (v.started) ctx.rebuildQueue(v);
    return false;
  }],
  [R.SET_VRING_BASE, (ctx, _msg, p) => {
    const { index, num } = vringState(p);
    const v = ctx.vring(index);
    // Split: the next avail index (u16). Packed: avail and used positions with their wrap
    // counters in all 32 bits (packed_layout.ts `packedRingBase`), as QEMU's
    // virtio_queue_packed_get_last_avail_idx sends them.
    v.base = isPacked(ctx) ? num >>> 0 : num & 0xffff;
    if (v.stoppedAt !== null && v.stoppedAt !== v.base) ctx.session.driverResetSuspected = true;
    if (v.queue !== null) v.queue.ringBase = v.base;
    return false;
  }],
  [R.GET_VRING_BASE, (ctx, msg, p) => {
    const { index } = vringState(p);
    const v = ctx.vring(index);
    const base = ctx.stopRing(v);
    ctx.send(encodeVringStateReply(msg.request, { index, num: base }));
    return true;
  }],
  [R.SET_VRING_KICK, (ctx, msg, p) => {
    if (p.kind !== "vringFd") throw new RequestError("bad payload");
    const v = ctx.vring(p.value.index);
    // Take the new fd first: a rejected request must leave the ring as it was.
    const fd = p.value.noFd ? -1 : takeEventFd(ctx, msg, "kick");
    if (v.kickFd >= 0) {
      ctx.reactor.removeFd(v.kickFd);
      close(v.kickFd);
      v.kickFd = -1;
    }
    if (fd >= 0) {
      v.kickFd = fd;
      // Edge-triggered: every write to the eventfd is an edge, so the counter need not be
      // read back (one system call less per kick; it cannot reach 2^64 - 1).
      ctx.reactor.addFd(fd, EPOLLIN | EPOLLET, () => ctx.onKick(v));
    } else if (requestLog.allow()) {
      log.warn(
        `vhost-user: vring ${v.index}: no kick fd (polling mode); processing on other events only`,
      );
    }
    ctx.startRing(v);
    return false;
  }],
  [R.SET_VRING_CALL, (ctx, msg, p) => {
    if (p.kind !== "vringFd") throw new RequestError("bad payload");
    const v = ctx.vring(p.value.index);
    v.setCallFd(p.value.noFd ? -1 : takeEventFd(ctx, msg, "call"));
    return false;
  }],
  [R.SET_VRING_ERR, (ctx, msg, p) => {
    if (p.kind !== "vringFd") throw new RequestError("bad payload");
    const v = ctx.vring(p.value.index);
    v.setErrFd(p.value.noFd ? -1 : takeEventFd(ctx, msg, "error"));
    return false;
  }],
  [R.SET_VRING_ENABLE, (ctx, _msg, p) => {
    const { index, num } = vringState(p);
    const v = ctx.vring(index);
    const s = ctx.session;
    if ((s.ackedFeatures & PROTOCOL_FEATURES_MASK) === 0n && s.featuresSet && requestLog.allow()) {
      log.warn(`vhost-user: SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES acked`);
    }
    v.enabled = num !== 0;
    ctx.updateActive(v);
    return false;
  }],
  [R.VRING_KICK, (ctx, _msg, p) => {
    const { index } = vringState(p);
    const v = ctx.vring(index);
    if (v.active) ctx.device.queueKicked(v.index);
    else v.pendingKicks++;
    return false;
  }],
]);
