/**
 * Feature negotiation and ownership requests of the vhost-user back end
 * (`docs/interop/vhost-user.rst`): GET/SET_FEATURES (virtio features plus
 * VHOST_USER_F_PROTOCOL_FEATURES and VHOST_F_LOG_ALL), GET/SET_PROTOCOL_FEATURES,
 * SET_OWNER, RESET_OWNER / RESET_DEVICE and GET_QUEUE_NUM.
 */

import { log } from "../log.ts";
import { VIRTIO_F_RING_PACKED_MASK, VIRTIO_RING_F_EVENT_IDX_MASK } from "../virtio/features.ts";
import {
  type Handler,
  type HandlerContext,
  RequestError,
  requestLog,
  u64,
} from "./handler_context.ts";
import {
  VHOST_F_LOG_ALL_MASK as LOG_ALL_MASK,
  VHOST_USER_F_PROTOCOL_FEATURES_MASK as PROTOCOL_FEATURES_MASK,
  VhostUserRequest as R,
} from "./protocol.ts";

/** Handlers of the negotiation requests, by request id. */
export const NEGOTIATION_HANDLERS: ReadonlyMap<number, Handler> = new Map<number, Handler>([
  [R.GET_FEATURES, (ctx, msg) => {
    ctx.replyU64(msg.request, ctx.offeredFeatures);
    return true;
  }],
  [R.SET_FEATURES, (ctx, _msg, p) => {
    setFeatures(ctx, u64(p));
    return false;
  }],
  [R.GET_PROTOCOL_FEATURES, (ctx, msg) => {
    ctx.replyU64(msg.request, ctx.offeredProtocolFeatures);
    return true;
  }],
  [R.SET_PROTOCOL_FEATURES, (ctx, _msg, p) => {
    const f = u64(p);
    const unknown = f & ~ctx.offeredProtocolFeatures;
    if (unknown !== 0n && requestLog.allow()) {
      log.warn(
        `vhost-user: front end acked protocol features we did not offer: 0x${unknown.toString(16)}`,
      );
    }
    ctx.session.ackedProtocol = f & ctx.offeredProtocolFeatures;
    return false;
  }],
  [R.SET_OWNER, (ctx) => {
    ctx.session.owner = true;
    return false;
  }],
  [R.RESET_OWNER, (ctx) => {
    ctx.resetDevice("RESET_OWNER");
    return false;
  }],
  [R.RESET_DEVICE, (ctx) => {
    ctx.resetDevice("RESET_DEVICE");
    return false;
  }],
  [R.GET_QUEUE_NUM, (ctx, msg) => {
    ctx.replyU64(msg.request, ctx.vrings.length);
    return true;
  }],
]);

function setFeatures(ctx: HandlerContext, f: bigint): void {
  const unknown = f & ~ctx.offeredFeatures;
  if (unknown !== 0n) {
    throw new RequestError(
      `front end acked features we did not offer: 0x${unknown.toString(16)}`,
    );
  }
  const s = ctx.session;
  // Features that change the rings' layout: their queues are rebuilt.
  const layout = VIRTIO_RING_F_EVENT_IDX_MASK | VIRTIO_F_RING_PACKED_MASK;
  const layoutChanged = ((f ^ s.ackedFeatures) & layout) !== 0n;
  s.ackedFeatures = f;
  s.featuresSet = true;
  ctx.memory.setLogging((f & LOG_ALL_MASK) !== 0n);
  if ((f & PROTOCOL_FEATURES_MASK) === 0n) {
    // "If VHOST_USER_F_PROTOCOL_FEATURES has not been negotiated, the ring starts directly
    // in the enabled state."
    for (const v of ctx.vrings) v.enabled = true;
  }
  ctx.device.setFeatures(f & ~(PROTOCOL_FEATURES_MASK | LOG_ALL_MASK));
  if (layoutChanged) ctx.rebuildQueues();
}
