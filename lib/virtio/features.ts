/**
 * Virtio feature bits that are independent of the device type (virtio 1.3,
 * section 6 "Reserved Feature Bits"), plus helpers over 64-bit feature words.
 *
 * Feature words travel as u64 (GET_FEATURES / SET_FEATURES in vhost-user), so
 * they are BigInts here; this is control-plane code, never a per-packet path.
 * Each feature is exported twice: its bit number under the spec's name
 * (`VIRTIO_F_VERSION_1 = 32`) and its mask with a `_MASK` suffix
 * (`VIRTIO_F_VERSION_1_MASK = 1n << 32n`).
 */

/** Device may notify when it runs out of available buffers, despite suppression. */
export const VIRTIO_F_NOTIFY_ON_EMPTY = 24;
/** Legacy: the device accepts arbitrary descriptor layouts. */
export const VIRTIO_F_ANY_LAYOUT = 27;
/** Driver may use descriptors with VRING_DESC_F_INDIRECT. */
export const VIRTIO_RING_F_INDIRECT_DESC = 28;
/** used_event / avail_event fields enable notification suppression by index. */
export const VIRTIO_RING_F_EVENT_IDX = 29;
/** Compliance with virtio 1.0 or later (modern device). */
export const VIRTIO_F_VERSION_1 = 32;
/** Device is behind an IOMMU / platform-specific access restrictions. */
export const VIRTIO_F_ACCESS_PLATFORM = 33;
/** Packed virtqueue layout. */
export const VIRTIO_F_RING_PACKED = 34;
/** Buffers are used by the device in the order they were made available. */
export const VIRTIO_F_IN_ORDER = 35;
/** Memory accesses must be ordered as the platform requires (hardware devices). */
export const VIRTIO_F_ORDER_PLATFORM = 36;
/** Single root I/O virtualization. */
export const VIRTIO_F_SR_IOV = 37;
/** Driver passes extra data (ring position) in its available buffer notifications. */
export const VIRTIO_F_NOTIFICATION_DATA = 38;
/** Driver uses the config-provided notification data. */
export const VIRTIO_F_NOTIF_CONFIG_DATA = 39;
/** Individual virtqueues can be reset. */
export const VIRTIO_F_RING_RESET = 40;
/** Administration virtqueues. */
export const VIRTIO_F_ADMIN_VQ = 41;

/** The mask of one feature bit. */
export function featureMask(bit: number): bigint {
  if (!Number.isInteger(bit) || bit < 0 || bit > 63) {
    throw new RangeError(`feature bit ${bit} is outside 0..63`);
  }
  return 1n << BigInt(bit);
}

export const VIRTIO_F_NOTIFY_ON_EMPTY_MASK: bigint = featureMask(VIRTIO_F_NOTIFY_ON_EMPTY);
export const VIRTIO_F_ANY_LAYOUT_MASK: bigint = featureMask(VIRTIO_F_ANY_LAYOUT);
export const VIRTIO_RING_F_INDIRECT_DESC_MASK: bigint = featureMask(VIRTIO_RING_F_INDIRECT_DESC);
export const VIRTIO_RING_F_EVENT_IDX_MASK: bigint = featureMask(VIRTIO_RING_F_EVENT_IDX);
export const VIRTIO_F_VERSION_1_MASK: bigint = featureMask(VIRTIO_F_VERSION_1);
export const VIRTIO_F_ACCESS_PLATFORM_MASK: bigint = featureMask(VIRTIO_F_ACCESS_PLATFORM);
export const VIRTIO_F_RING_PACKED_MASK: bigint = featureMask(VIRTIO_F_RING_PACKED);
export const VIRTIO_F_IN_ORDER_MASK: bigint = featureMask(VIRTIO_F_IN_ORDER);
export const VIRTIO_F_ORDER_PLATFORM_MASK: bigint = featureMask(VIRTIO_F_ORDER_PLATFORM);
export const VIRTIO_F_SR_IOV_MASK: bigint = featureMask(VIRTIO_F_SR_IOV);
export const VIRTIO_F_NOTIFICATION_DATA_MASK: bigint = featureMask(VIRTIO_F_NOTIFICATION_DATA);
export const VIRTIO_F_NOTIF_CONFIG_DATA_MASK: bigint = featureMask(VIRTIO_F_NOTIF_CONFIG_DATA);
export const VIRTIO_F_RING_RESET_MASK: bigint = featureMask(VIRTIO_F_RING_RESET);
export const VIRTIO_F_ADMIN_VQ_MASK: bigint = featureMask(VIRTIO_F_ADMIN_VQ);

/** Spec names of the bits above, for logs. */
export const VIRTIO_FEATURE_NAMES: ReadonlyMap<number, string> = new Map([
  [VIRTIO_F_NOTIFY_ON_EMPTY, "VIRTIO_F_NOTIFY_ON_EMPTY"],
  [VIRTIO_F_ANY_LAYOUT, "VIRTIO_F_ANY_LAYOUT"],
  [VIRTIO_RING_F_INDIRECT_DESC, "VIRTIO_RING_F_INDIRECT_DESC"],
  [VIRTIO_RING_F_EVENT_IDX, "VIRTIO_RING_F_EVENT_IDX"],
  [VIRTIO_F_VERSION_1, "VIRTIO_F_VERSION_1"],
  [VIRTIO_F_ACCESS_PLATFORM, "VIRTIO_F_ACCESS_PLATFORM"],
  [VIRTIO_F_RING_PACKED, "VIRTIO_F_RING_PACKED"],
  [VIRTIO_F_IN_ORDER, "VIRTIO_F_IN_ORDER"],
  [VIRTIO_F_ORDER_PLATFORM, "VIRTIO_F_ORDER_PLATFORM"],
  [VIRTIO_F_SR_IOV, "VIRTIO_F_SR_IOV"],
  [VIRTIO_F_NOTIFICATION_DATA, "VIRTIO_F_NOTIFICATION_DATA"],
  [VIRTIO_F_NOTIF_CONFIG_DATA, "VIRTIO_F_NOTIF_CONFIG_DATA"],
  [VIRTIO_F_RING_RESET, "VIRTIO_F_RING_RESET"],
  [VIRTIO_F_ADMIN_VQ, "VIRTIO_F_ADMIN_VQ"],
]);

/** True if feature `bit` is set in `features`. */
export function hasFeature(features: bigint, bit: number): boolean {
  return (features & featureMask(bit)) !== 0n;
}

/** `features` with `bit` set. */
export function withFeature(features: bigint, bit: number): bigint {
  return features | featureMask(bit);
}

/** `features` with `bit` cleared. */
export function withoutFeature(features: bigint, bit: number): bigint {
  return features & ~featureMask(bit);
}

/** Builds a feature word from bit numbers. */
export function featureWord(...bits: number[]): bigint {
  let w = 0n;
  for (const b of bits) w |= featureMask(b);
  return w;
}

/** The numbers of the bits set in a (u64) feature word, ascending. */
export function featureBits(features: bigint): number[] {
  const out: number[] = [];
  for (let b = 0; b < 64; b++) if ((features >> BigInt(b)) & 1n) out.push(b);
  return out;
}

/**
 * A readable list of the set bits: spec names for the bits this module knows,
 * then `extra` names (e.g. device-specific bits), else `bit N`.
 */
export function describeFeatures(
  features: bigint,
  extra: ReadonlyMap<number, string> = new Map(),
): string {
  return featureBits(features)
    .map((b) => VIRTIO_FEATURE_NAMES.get(b) ?? extra.get(b) ?? `bit ${b}`)
    .join(" | ");
}
