/**
 * The `qemu` profile of the testing front end: the message sequences of QEMU 7.2
 * `vhost-user-vsock-pci` (hw/virtio/vhost-user-vsock.c, vhost.c, vhost-user.c).
 *
 * Realize: GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (the offered bits QEMU
 * 7.2 knows, MQ..STATUS: it never acks DEVICE_STATE; it refuses a back end without CONFIG),
 * GET_QUEUE_NUM (MQ), GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS), SET_OWNER, GET_FEATURES,
 * SET_VRING_CALL per queue with a "masked" notifier, GET_CONFIG (8 bytes, cached: the guest's
 * config reads never reach the back end).
 *
 * Driver start (DRIVER_OK): SET_FEATURES, [GET_STATUS, SET_STATUS |FEATURES_OK], the memory
 * table (ADD_MEM_REG per region not yet announced when CONFIGURE_MEM_SLOTS is acked, else
 * SET_MEM_TABLE; with NEED_REPLY under REPLY_ACK), per queue SET_VRING_NUM, SET_VRING_BASE,
 * SET_VRING_ADDR, SET_VRING_KICK, then SET_VRING_ENABLE 1 per queue, [GET_STATUS, SET_STATUS
 * |ACKNOWLEDGE|DRIVER|DRIVER_OK], and finally SET_VRING_CALL with the real call eventfd
 * ("unmask"). Only rx (0) and tx (1) go to the back end: QEMU keeps the event queue and
 * injects TRANSPORT_RESET itself (`qemuInjectEvent`).
 *
 * Stop: [SET_STATUS 0], SET_VRING_ENABLE 0, GET_VRING_BASE per queue. Waits QEMU makes
 * without REPLY_ACK use GET_FEATURES as a barrier.
 */

import { eventFd, eventFdRead, eventFdWrite } from "../../ffi/mod.ts";
import {
  VHOST_F_LOG_ALL_MASK,
  VhostUserProtocolFeatureMask as PF,
} from "../vhost_user/protocol.ts";
import {
  VIRTIO_CONFIG_S_ACKNOWLEDGE,
  VIRTIO_CONFIG_S_DRIVER,
  VIRTIO_CONFIG_S_DRIVER_OK,
  VIRTIO_CONFIG_S_FEATURES_OK,
} from "../virtio/device_status.ts";
import {
  featureMask,
  VIRTIO_F_NOTIFY_ON_EMPTY,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../virtio/features.ts";
import {
  availElemOffset,
  usedElemOffset,
  VRING_AVAIL_IDX,
  VRING_DESC_ADDR,
  VRING_DESC_F_WRITE,
  VRING_DESC_FLAGS,
  VRING_DESC_LEN,
  VRING_DESC_SIZE,
  VRING_USED_ELEM_ID,
  VRING_USED_ELEM_LEN,
  VRING_USED_ELEM_SIZE,
  VRING_USED_IDX,
} from "../virtio/split_layout.ts";
import {
  isAvailable,
  PACKED_DESC_ADDR,
  PACKED_DESC_FLAGS,
  PACKED_DESC_ID,
  PACKED_DESC_LEN,
  PACKED_DESC_SIZE,
  packedRingBase,
  parsePackedRingBase,
  usedFlags,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
} from "../virtio/packed_layout.ts";
import {
  VIRTIO_VSOCK_CONFIG_SIZE,
  VIRTIO_VSOCK_EVENT_SIZE,
  VIRTIO_VSOCK_F_SEQPACKET,
} from "../vsock/constants.ts";
import { writePackedDescriptor } from "../virtio/packed_layout.ts";
import type { GuestRam } from "./guest_ram.ts";
import { VhostUserError } from "./vhost_user_channel.ts";
import type { VhostUserClient } from "./vhost_user_client.ts";
import type { ProtocolFeatureChooser, QueueSetup, StartHooks } from "./vmm_profile.ts";

/** Protocol features QEMU 7.2 knows (`VHOST_USER_PROTOCOL_F_MAX` = 17): MQ (0) .. STATUS (16). */
export const QEMU_7_2_PROTOCOL_FEATURES: bigint = (1n << 17n) - 1n;

/**
 * Virtio features QEMU 7.2 lets a vhost-user-vsock back end offer to the guest: the device's
 * `user_feature_bits` and vhost-vsock-common's `feature_bits` that QEMU's virtio-pci offers by
 * default (VERSION_1, INDIRECT_DESC, EVENT_IDX, NOTIFY_ON_EMPTY) plus SEQPACKET.
 * `VIRTIO_VSOCK_F_STREAM` is not among them: QEMU never passes bit 0 to the guest.
 */
export const QEMU_GUEST_FEATURES: bigint = featureMask(VIRTIO_F_VERSION_1) |
  featureMask(VIRTIO_RING_F_INDIRECT_DESC) | featureMask(VIRTIO_RING_F_EVENT_IDX) |
  featureMask(VIRTIO_F_NOTIFY_ON_EMPTY) | featureMask(VIRTIO_VSOCK_F_SEQPACKET);

/** Virtqueues QEMU hands to a vhost-user-vsock back end: rx and tx (it keeps the event queue). */
export const QEMU_BACKEND_QUEUE_COUNT = 2;

/** The virtqueue size QEMU offers by default. */
export const QEMU_DEFAULT_QUEUE_SIZE = 128;

/**
 * Realize (vhost_user_backend_init, vhost_dev_init, vuv_device_realize). The masked call
 * eventfds it creates are stored in `maskedCallFds` (the caller closes them). Returns the
 * device config QEMU caches.
 */
export function qemuRealize(
  c: VhostUserClient,
  choose: ProtocolFeatureChooser,
  maskedCallFds: number[],
): Uint8Array {
  // vhost_user_backend_init
  c.getFeatures();
  if (c.protocolFeaturesOn) {
    c.getProtocolFeatures();
    if ((c.backendProtocolFeatures & PF.CONFIG) === 0n) {
      throw new VhostUserError(
        "qemu: Device expects VHOST_USER_PROTOCOL_F_CONFIG but backend does not support it",
      );
    }
    c.setProtocolFeatures(choose(QEMU_7_2_PROTOCOL_FEATURES));
    if (c.hasProtocolFeature(PF.MQ)) {
      const n = c.getQueueNum();
      if (n < 2) throw new VhostUserError(`qemu: GET_QUEUE_NUM = ${n}, vsock needs 2`);
    }
    if (c.hasProtocolFeature(PF.CONFIGURE_MEM_SLOTS)) {
      const slots = c.getMaxMemSlots();
      if (slots < c.memory.regions.length) {
        throw new VhostUserError(
          `qemu: the back end has ${slots} memory slots, the guest ${c.memory.regions.length} regions`,
        );
      }
    }
  }
  // vhost_dev_init
  c.setOwner();
  c.getFeatures();
  for (let i = 0; i < QEMU_BACKEND_QUEUE_COUNT; i++) {
    const masked = eventFd();
    maskedCallFds[i] = masked;
    c.setVringCall(i, masked);
  }
  // vuv_device_realize: vhost_dev_get_config
  if (!c.hasProtocolFeature(PF.CONFIG)) {
    throw new VhostUserError("qemu: vhost-user-vsock needs the CONFIG protocol feature");
  }
  const cfg = c.getConfig(0, VIRTIO_VSOCK_CONFIG_SIZE, 0);
  if (cfg === null) throw new VhostUserError("qemu: GET_CONFIG failed at realize");
  return cfg;
}

/** A guest config read: QEMU answers from the config cached at realize. */
export function qemuReadConfig(cache: Uint8Array | null, offset: number, size: number): Uint8Array {
  if (cache === null) throw new VhostUserError("qemu: no config cached (init not run?)");
  if (offset + size > cache.length) {
    throw new RangeError(`config read beyond ${cache.length} bytes`);
  }
  return cache.slice(offset, offset + size);
}

/** DRIVER_OK: vhost_dev_start for the back-end queues `qs`. */
export function qemuStart(
  c: VhostUserClient,
  driverFeatures: bigint,
  qs: readonly QueueSetup[],
  hooks: StartHooks,
  maskedCallFds: readonly number[],
): void {
  const statusOn = c.hasProtocolFeature(PF.STATUS);
  // vhost_dev_set_features -> vhost_user_set_features
  const features = c.backendFeaturesFor(driverFeatures);
  const logging = (features & VHOST_F_LOG_ALL_MASK) !== 0n;
  c.setFeatures(features, { needReply: logging });
  if (logging) qemuBarrier(c);
  if (statusOn) qemuAddStatus(c, VIRTIO_CONFIG_S_FEATURES_OK);
  // vhost_user_set_mem_table
  qemuMemTable(c);
  // vhost_virtqueue_start
  for (const q of qs) {
    c.setVringNum(q.index, q.size);
    c.setVringBase(q.index, q.base);
    c.setVringAddr(q.index, q, { log: logging });
    c.setVringKick(q.index);
  }
  hooks.beforeEnable?.();
  if (c.protocolFeaturesOn) {
    for (const q of qs) c.setVringEnable(q.index, true);
  }
  if (statusOn) {
    qemuAddStatus(
      c,
      VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
    );
  }
  // vhost_vsock_common_start: vhost_virtqueue_mask(false) per queue
  for (const q of qs) qemuUnmask(c, q.index, maskedCallFds);
}

/** vhost_dev_stop for the back-end queues `qs`; stores the bases in `bases`. */
export function qemuStop(c: VhostUserClient, qs: readonly QueueSetup[], bases: number[]): void {
  if (c.hasProtocolFeature(PF.STATUS)) qemuSetStatus(c, 0);
  if (c.protocolFeaturesOn) { for (const q of qs) c.setVringEnable(q.index, false); }
  for (const q of qs) bases[q.index] = c.getVringBase(q.index);
}

/**
 * QEMU's `enforce_reply`: wait until the back end processed the previous request. With
 * REPLY_ACK the request carried NEED_REPLY and its ack was read; without it QEMU sends
 * GET_FEATURES, "which makes all backends send a reply".
 */
function qemuBarrier(c: VhostUserClient): void {
  if (!c.hasProtocolFeature(PF.REPLY_ACK)) c.getFeatures();
}

/** QEMU's vhost_user_add_status: GET_STATUS, then SET_STATUS |bits unless already set. */
function qemuAddStatus(c: VhostUserClient, bits: number): void {
  const s = c.getStatus();
  if ((s & bits) === bits) return;
  qemuSetStatus(c, s | bits);
}

/** QEMU's vhost_user_set_status: SET_STATUS with wait_for_reply. */
function qemuSetStatus(c: VhostUserClient, status: number): void {
  const replyAck = c.hasProtocolFeature(PF.REPLY_ACK);
  c.setStatus(status, { needReply: replyAck });
  qemuBarrier(c);
}

function qemuMemTable(c: VhostUserClient): void {
  const replyAck = c.hasProtocolFeature(PF.REPLY_ACK);
  if (c.hasProtocolFeature(PF.CONFIGURE_MEM_SLOTS)) {
    // vhost_user_add_remove_regions: diff against what the back end has.
    const want = new Set(c.memory.regions);
    for (const r of c.announcedRegions) {
      if (!want.has(r)) c.remMemReg(r, { needReply: replyAck });
    }
    const announced = new Set(c.announcedRegions);
    for (const r of c.memory.regions) {
      if (!announced.has(r)) c.addMemReg(r, { needReply: replyAck });
    }
  } else {
    c.setMemTable(c.memory.regions, { needReply: replyAck });
  }
}

function qemuUnmask(c: VhostUserClient, index: number, maskedCallFds: readonly number[]): void {
  c.setVringCall(index);
  // virtio-pci checks the masked notifier for interrupts raised while masked.
  const masked = maskedCallFds[index];
  if (masked !== undefined && eventFdRead(masked) !== 0n) eventFdWrite(c.callFds[index]);
}

/**
 * QEMU's event injection (the VMM owns the event queue `q`): takes the next available event
 * buffer as the device (`lastAvail` is the VMM's next avail index), writes `{le32 id}`, puts
 * it on the used ring. Returns the new next avail index (for a packed ring, `lastAvail` and
 * the result are vring bases, see `qemuInjectEventPacked`); the caller then interrupts the
 * guest. Throws if the guest posted no buffer, like QEMU's "vhost-vsock missed transport
 * reset event".
 */
export function qemuInjectEvent(m: GuestRam, q: QueueSetup, lastAvail: number, id: number): number {
  if (q.packed) return qemuInjectEventPacked(m, q, lastAvail, id);
  const availIdx = readU16(m, q.availGpa + VRING_AVAIL_IDX);
  if (availIdx === lastAvail) {
    throw new VhostUserError("injectEvent: the guest posted no event buffer (event missed)");
  }
  const slot = lastAvail & (q.size - 1);
  const head = readU16(m, q.availGpa + availElemOffset(slot));
  if (head >= q.size) throw new VhostUserError(`injectEvent: bad head ${head}`);
  const d = q.descGpa + head * VRING_DESC_SIZE;
  const dv = new DataView(m.read(d, VRING_DESC_SIZE).buffer);
  const addr = dv.getUint32(VRING_DESC_ADDR, true) +
    dv.getUint32(VRING_DESC_ADDR + 4, true) * 2 ** 32;
  const len = dv.getUint32(VRING_DESC_LEN, true);
  const flags = dv.getUint16(VRING_DESC_FLAGS, true);
  if (len < VIRTIO_VSOCK_EVENT_SIZE || (flags & VRING_DESC_F_WRITE) === 0) {
    throw new VhostUserError(`injectEvent: event buffer ${head} is not a writable 4-byte buffer`);
  }
  const ev = new Uint8Array(VIRTIO_VSOCK_EVENT_SIZE);
  new DataView(ev.buffer).setUint32(0, id, true);
  m.write(addr, ev);
  const usedIdx = readU16(m, q.usedGpa + VRING_USED_IDX);
  const e = new Uint8Array(VRING_USED_ELEM_SIZE);
  const ev2 = new DataView(e.buffer);
  ev2.setUint32(VRING_USED_ELEM_ID, head, true);
  ev2.setUint32(VRING_USED_ELEM_LEN, VIRTIO_VSOCK_EVENT_SIZE, true);
  m.write(q.usedGpa + usedElemOffset(usedIdx & (q.size - 1)), e);
  const idx = new Uint8Array(2);
  new DataView(idx.buffer).setUint16(0, (usedIdx + 1) & 0xffff, true);
  m.write(q.usedGpa + VRING_USED_IDX, idx);
  return (lastAvail + 1) & 0xffff;
}

/**
 * `qemuInjectEvent` on a packed event queue: `base` is the VMM's `packedRingBase` of the queue;
 * the buffer at the next avail slot must be available for the avail wrap counter; the used
 * descriptor (id, length 4, WRITE and the used wrap counter's AVAIL/USED bits, flags last)
 * goes to the next used slot. Returns the new base.
 */
function qemuInjectEventPacked(m: GuestRam, q: QueueSetup, base: number, id: number): number {
  const b = parsePackedRingBase(base);
  const dv = new DataView(
    m.read(q.descGpa + b.availIdx * PACKED_DESC_SIZE, PACKED_DESC_SIZE).buffer,
  );
  const flags = dv.getUint16(PACKED_DESC_FLAGS, true);
  if (!isAvailable(flags, b.availWrap)) {
    throw new VhostUserError("injectEvent: the guest posted no event buffer (event missed)");
  }
  const bufId = dv.getUint16(PACKED_DESC_ID, true);
  const addr = dv.getUint32(PACKED_DESC_ADDR, true) +
    dv.getUint32(PACKED_DESC_ADDR + 4, true) * 2 ** 32;
  const len = dv.getUint32(PACKED_DESC_LEN, true);
  const single = (flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT)) === 0;
  if (!single || len < VIRTIO_VSOCK_EVENT_SIZE || (flags & VIRTQ_DESC_F_WRITE) === 0) {
    throw new VhostUserError(`injectEvent: event buffer ${bufId} is not a writable 4-byte buffer`);
  }
  const ev = new Uint8Array(VIRTIO_VSOCK_EVENT_SIZE);
  new DataView(ev.buffer).setUint32(0, id, true);
  m.write(addr, ev);
  const used = m.bytesAt(q.descGpa + b.usedIdx * PACKED_DESC_SIZE, PACKED_DESC_SIZE);
  writePackedDescriptor(
    new DataView(used.buffer, used.byteOffset, PACKED_DESC_SIZE),
    0,
    0,
    VIRTIO_VSOCK_EVENT_SIZE,
    bufId,
    usedFlags(b.usedWrap) | VIRTQ_DESC_F_WRITE,
  );
  const next = (idx: number, wrap: number) =>
    idx + 1 === q.size ? { idx: 0, wrap: wrap ^ 1 } : { idx: idx + 1, wrap };
  const a = next(b.availIdx, b.availWrap);
  const u = next(b.usedIdx, b.usedWrap);
  return packedRingBase({ availIdx: a.idx, availWrap: a.wrap, usedIdx: u.idx, usedWrap: u.wrap });
}

function readU16(m: GuestRam, gpa: number): number {
  const b = m.bytesAt(gpa, 2);
  return b[0] | (b[1] << 8);
}
