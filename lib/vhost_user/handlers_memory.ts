/**
 * Guest memory requests of the vhost-user back end (`docs/interop/vhost-user.rst`):
 * SET_MEM_TABLE (the whole table, one fd per region), GET_MAX_MEM_SLOTS, ADD_MEM_REG and
 * REM_MEM_REG (CONFIGURE_MEM_SLOTS), and the dirty log (SET_LOG_BASE under LOG_SHMFD,
 * SET_LOG_FD). Rings are re-mapped whenever the memory they live in changes.
 */

import { close, mapShared } from "../../ffi/mod.ts";
import { log } from "../log.ts";
import { checkBacked } from "./guest_memory.ts";
import { type Handler, type HandlerContext, RequestError, requestLog } from "./handler_context.ts";
import type { RawMessage } from "./message_reader.ts";
import type { Payload } from "./messages.ts";
import {
  VHOST_F_LOG_ALL_MASK as LOG_ALL_MASK,
  VHOST_USER_MAX_RAM_SLOTS,
  VhostUserRequest as R,
} from "./protocol.ts";
import type { Vring } from "./vring.ts";

/** Handlers of the memory requests, by request id. */
export const MEMORY_HANDLERS: ReadonlyMap<number, Handler> = new Map<number, Handler>([
  [R.GET_MAX_MEM_SLOTS, (ctx, msg) => {
    ctx.replyU64(msg.request, VHOST_USER_MAX_RAM_SLOTS);
    return true;
  }],
  [R.SET_MEM_TABLE, (ctx, msg, p) => {
    setMemTable(ctx, msg, p);
    return false;
  }],
  [R.ADD_MEM_REG, (ctx, msg, p) => {
    if (p.kind !== "memRegion") throw new RequestError("bad payload");
    if (ctx.memory.regions.length >= VHOST_USER_MAX_RAM_SLOTS) {
      throw new RequestError(`more than ${VHOST_USER_MAX_RAM_SLOTS} memory regions`);
    }
    ctx.memory.add(p.value, ctx.takeFd(msg));
    ctx.rebuildQueues();
    return false;
  }],
  [R.REM_MEM_REG, (ctx, _msg, p) => {
    if (p.kind !== "memRegion") throw new RequestError("bad payload");
    const { guestAddr, size } = p.value;
    // Check first: a rejected request must leave the rings as they were.
    if (!ctx.memory.regions.some((r) => r.gpa === guestAddr && r.size === size)) {
      throw new RequestError(`no region at guest address 0x${guestAddr.toString(16)}`);
    }
    const inUse = ctx.vrings.some((v) => v.queue !== null && ringInRegion(v, p.value));
    if (inUse) ctx.deactivateAll();
    ctx.memory.remove(guestAddr, size);
    ctx.rebuildQueues();
    return false;
  }],
  [R.SET_LOG_BASE, (ctx, msg, p) => {
    if (p.kind !== "log") throw new RequestError("bad payload");
    const fd = ctx.takeFd(msg);
    try {
      checkBacked(fd, p.value.mmapOffset, p.value.mmapSize, "dirty log");
      ctx.memory.setLog(mapShared(fd, p.value.mmapSize, p.value.mmapOffset));
    } finally {
      close(fd);
    }
    ctx.memory.setLogging((ctx.session.ackedFeatures & LOG_ALL_MASK) !== 0n);
    if (requestLog.allow()) log.info(`vhost-user: dirty log installed (${p.value.mmapSize} bytes)`);
    ctx.replyU64(msg.request, 0);
    return true;
  }],
  // Only signalled with LOG_SHMFD-less logging we do not offer; keep nothing.
  [R.SET_LOG_FD, () => false],
]);

function setMemTable(ctx: HandlerContext, msg: RawMessage, p: Payload): void {
  if (p.kind !== "memTable") throw new RequestError("bad payload");
  const regions = p.value.regions;
  if (msg.fds.length !== regions.length) {
    throw new RequestError(`${regions.length} regions but ${msg.fds.length} fds`);
  }
  const wasActive = ctx.vrings.filter((v) => v.active);
  ctx.deactivateAll();
  ctx.memory.clear();
  try {
    for (let i = 0; i < regions.length; i++) ctx.memory.add(regions[i], ctx.takeFd(msg, i));
  } finally {
    // Even when a region is refused: the rings' queues were built over mappings that are
    // gone now; keeping them would let a later SET_VRING_ENABLE hand the device a queue
    // over unmapped memory (a SIGSEGV, found by the front-end fuzzer).
    ctx.rebuildQueues();
  }
  if (requestLog.allow()) {
    log.info(
      `vhost-user: memory table: ${
        regions.map((r) => `[0x${r.guestAddr.toString(16)} +${r.size}]`).join(" ")
      }`,
    );
  }
  if (wasActive.length) log.debug(`vhost-user: ${wasActive.length} rings re-mapped`);
}

function ringInRegion(v: Vring, r: { userAddr: number; size: number }): boolean {
  return [v.descUser, v.availUser, v.usedUser].some((a) =>
    a >= r.userAddr && a < r.userAddr + r.size
  );
}
