/**
 * The `crosvm` profile of the testing front end: the message sequences of crosvm's
 * `VhostUserFrontend` (devices/src/virtio/vhost_user_frontend).
 *
 * Create: SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (CONFIG, MQ,
 * DEVICE_STATE, REPLY_ACK as offered; crosvm also wants BACKEND_REQ and SHMEM, which this
 * library withholds because it serves no back-end requests), GET_QUEUE_NUM: all 3 queues,
 * the event queue included, go to the back end.
 *
 * Config reads: GET_CONFIG per guest access (two 4-byte reads for the le64 CID, flags
 * WRITABLE). Activate: SET_FEATURES (when changed), SET_MEM_TABLE, per queue SET_VRING_NUM,
 * SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_CALL, SET_VRING_KICK, SET_VRING_ENABLE 1 (only
 * when PROTOCOL_FEATURES was acked). Sleep/reset: per queue SET_VRING_ENABLE 0,
 * GET_VRING_BASE. Snapshot and restore (driven by `front_end.ts`): SET_DEVICE_STATE_FD(save)
 * + read to EOF + CHECK_DEVICE_STATE; restore: SET_FEATURES, SET_DEVICE_STATE_FD(load) +
 * write + CHECK_DEVICE_STATE, activate with the saved bases, then a kick on every queue.
 * crosvm negotiates REPLY_ACK but never sets NEED_REPLY.
 */

import { VhostUserProtocolFeatureMask as PF } from "../vhost_user/protocol.ts";
import { featureMask, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX } from "../virtio/features.ts";
import { VSOCK_VQ_COUNT } from "../vsock/constants.ts";
import { VhostUserError } from "./vhost_user_channel.ts";
import type { VhostUserClient } from "./vhost_user_client.ts";
import type { ProtocolFeatureChooser, QueueSetup, StartHooks } from "./vmm_profile.ts";

/** GET_CONFIG / SET_CONFIG flag as crosvm names it (`VhostUserConfigFlags::WRITABLE`). */
export const VHOST_USER_CONFIG_FLAG_WRITABLE = 0x1;
/** GET_CONFIG / SET_CONFIG flag: access during live migration (`LIVE_MIGRATION`). */
export const VHOST_USER_CONFIG_FLAG_LIVE_MIGRATION = 0x2;

/**
 * Protocol features crosvm's front end acks when offered, minus BACKEND_REQ and SHMEM which
 * this library withholds (it does not serve back-end requests).
 */
export const CROSVM_PROTOCOL_FEATURES: bigint = PF.CONFIG | PF.MQ | PF.DEVICE_STATE | PF.REPLY_ACK;

/**
 * Virtio features crosvm passes from a vhost-user back end to the guest: every
 * device-specific bit (0..23) plus its `base_features` VERSION_1 and EVENT_IDX. crosvm does
 * not offer INDIRECT_DESC or NOTIFY_ON_EMPTY.
 */
export const CROSVM_GUEST_FEATURES: bigint = ((1n << 24n) - 1n) | featureMask(VIRTIO_F_VERSION_1) |
  featureMask(VIRTIO_RING_F_EVENT_IDX);

/** The virtqueue size crosvm offers by default. */
export const CROSVM_DEFAULT_QUEUE_SIZE = 256;

/** Virtqueues crosvm hands to the back end: GET_QUEUE_NUM (all 3 when not asked), at most 3. */
export function crosvmBackendQueueCount(queueNum: number | null): number {
  return Math.min(queueNum ?? VSOCK_VQ_COUNT, VSOCK_VQ_COUNT);
}

/** The create sequence. */
export function crosvmCreate(c: VhostUserClient, choose: ProtocolFeatureChooser): void {
  c.setOwner();
  c.getFeatures();
  if (c.protocolFeaturesOn) {
    c.getProtocolFeatures();
    c.setProtocolFeatures(choose(CROSVM_PROTOCOL_FEATURES));
  }
  if (c.hasProtocolFeature(PF.MQ)) {
    const n = c.getQueueNum();
    if (n < VSOCK_VQ_COUNT) {
      throw new VhostUserError(`crosvm: GET_QUEUE_NUM = ${n}, vsock needs ${VSOCK_VQ_COUNT}`);
    }
  }
}

/**
 * A guest config read: GET_CONFIG per 4-byte access (flags WRITABLE), as virtio-pci splits
 * the guest's 64-bit read.
 */
export function crosvmReadConfig(c: VhostUserClient, offset: number, size: number): Uint8Array {
  const out = new Uint8Array(size);
  for (let off = 0; off < size; off += 4) {
    const n = Math.min(4, size - off);
    const part = c.getConfig(offset + off, n, VHOST_USER_CONFIG_FLAG_WRITABLE);
    if (part === null) {
      throw new VhostUserError(`crosvm: GET_CONFIG [${offset + off}, +${n}) failed`);
    }
    out.set(part, off);
  }
  return out;
}

/** Activate for the back-end queues `qs`. */
export function crosvmStart(
  c: VhostUserClient,
  driverFeatures: bigint,
  qs: readonly QueueSetup[],
  hooks: StartHooks,
): void {
  const features = c.backendFeaturesFor(driverFeatures);
  if (c.ackedFeatures !== features) c.setFeatures(features);
  c.setMemTable();
  for (const q of qs) {
    c.setVringNum(q.index, q.size);
    c.setVringAddr(q.index, q);
    c.setVringBase(q.index, q.base);
    c.setVringCall(q.index);
    c.setVringKick(q.index);
    if (hooks.beforeEnable === undefined && c.protocolFeaturesOn) {
      c.setVringEnable(q.index, true);
    }
  }
  if (hooks.beforeEnable !== undefined) {
    hooks.beforeEnable();
    if (c.protocolFeaturesOn) { for (const q of qs) c.setVringEnable(q.index, true); }
  }
}

/** Sleep/reset for the back-end queues `qs`; stores the bases in `bases`. */
export function crosvmStop(c: VhostUserClient, qs: readonly QueueSetup[], bases: number[]): void {
  for (const q of qs) {
    if (c.protocolFeaturesOn) c.setVringEnable(q.index, false);
    bases[q.index] = c.getVringBase(q.index);
  }
}
