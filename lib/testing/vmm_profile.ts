/**
 * What the VMM profiles of the testing front end (`profile_qemu.ts`, `profile_crosvm.ts`)
 * share: the profile names, and the virtqueues as the guest driver laid them out, which a
 * profile's start sequence hands to the back end (SET_VRING_NUM/ADDR/BASE/KICK/CALL).
 */

/** Which VMM the front end imitates. */
export type FrontEndProfile = "qemu" | "crosvm";

/**
 * A virtqueue as the driver laid it out in guest memory. For a packed ring (`packed`,
 * VIRTIO_F_RING_PACKED) the three addresses are the descriptor ring, the driver event
 * suppression area and the device event suppression area, as SET_VRING_ADDR carries them.
 */
export interface QueueSetup {
  /** virtqueue index: 0 rx, 1 tx, 2 event */
  readonly index: number;
  /** entries (split: a power of 2; packed: 1..32768) */
  readonly size: number;
  /** packed layout (default false: split) */
  readonly packed?: boolean;
  /** descriptor table / ring */
  readonly descGpa: number;
  /** available ring / driver event suppression */
  readonly availGpa: number;
  /** used ring / device event suppression */
  readonly usedGpa: number;
  /**
   * SET_VRING_BASE: split, the next available index the device should process; packed,
   * `packedRingBase` of the next avail and used indices and wrap counters
   */
  readonly base: number;
}

/** Hooks into `startDevice` for race tests. */
export interface StartHooks {
  /** runs after the rings are set up (kick fds sent) and before any SET_VRING_ENABLE */
  readonly beforeEnable?: () => void;
}

/** Picks the protocol features to ack among those offered, given the profile's set. */
export type ProtocolFeatureChooser = (profileFeatures: bigint) => bigint;
