/**
 * Device config, status and state requests of the vhost-user back end
 * (`docs/interop/vhost-user.rst`): GET_CONFIG / SET_CONFIG (CONFIG; the vsock config space
 * is read-only), SET_STATUS / GET_STATUS (STATUS), SET_BACKEND_REQ_FD, and the device state
 * transfer SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE (DEVICE_STATE, see `device_state.ts`).
 */

import { log } from "../log.ts";
import { type Handler, RequestError, requestLog } from "./handler_context.ts";
import { encodeConfigReply, encodeU64Reply } from "./messages.ts";
import { VhostUserProtocolFeatureMask as PF, VhostUserRequest as R } from "./protocol.ts";

/** Handlers of the device requests, by request id. */
export const DEVICE_HANDLERS: ReadonlyMap<number, Handler> = new Map<number, Handler>([
  [R.GET_CONFIG, (ctx, _msg, p) => {
    if (p.kind !== "config") throw new RequestError("bad payload");
    const data = ctx.device.readConfig(p.value.offset, p.value.size);
    if (data === null && requestLog.allow()) {
      log.warn(`vhost-user: GET_CONFIG offset=${p.value.offset} size=${p.value.size} refused`);
    }
    ctx.send(encodeConfigReply(
      data === null
        ? null
        : { offset: p.value.offset, size: data.length, flags: p.value.flags, payload: data },
    ));
    return true;
  }],
  [R.SET_CONFIG, () => {
    throw new RequestError("the vsock config space is read-only");
  }],
  [R.SET_STATUS, (ctx, _msg, p) => {
    if (p.kind !== "status") throw new RequestError("bad payload");
    ctx.session.status = p.value;
    return false;
  }],
  [R.GET_STATUS, (ctx, msg) => {
    ctx.replyU64(msg.request, ctx.session.status);
    return true;
  }],
  // We never send back-end requests; the fd is closed by the dispatcher.
  [R.SET_BACKEND_REQ_FD, () => false],
  [R.SET_DEVICE_STATE_FD, (ctx, msg, p) => {
    if (p.kind !== "deviceState") throw new RequestError("bad payload");
    if ((ctx.session.ackedProtocol & PF.DEVICE_STATE) === 0n) {
      throw new RequestError("DEVICE_STATE was not negotiated");
    }
    const r = ctx.stateChannel.begin(
      p.value.direction,
      p.value.phase,
      ctx.takeFd(msg),
      ctx.allStopped(),
    );
    ctx.replyU64(msg.request, r);
    return true;
  }],
  [R.CHECK_DEVICE_STATE, (ctx, msg) => {
    // The answer may wait for the load's EOF: no further message is read meanwhile.
    const answer = ctx.holdReplies();
    ctx.stateChannel.check((r) => answer(encodeU64Reply(msg.request, r)));
    return true;
  }],
]);
