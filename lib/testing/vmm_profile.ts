/**
 * What the VMM profiles of the testing front end (`profile_qemu.ts`, `profile_crosvm.ts`)
 * share: the profile names, and the virtqueues as the guest driver laid them out, which a
 * profile's start sequence hands to the back end (SET_VRING_NUM/ADDR/BASE/KICK/CALL).
 */

/** Which VMM the front end imitates. */
export type FrontEndProfile = "qemu" | "crosvm";

/** A virtqueue as the driver laid it out in guest memory. */
export interface QueueSetup {
  /** virtqueue index: 0 rx, 1 tx, 2 event */
  readonly index: number;
  /** entries (a power of 2) */
  readonly size: number;
  readonly descGpa: number;
  readonly availGpa: number;
  readonly usedGpa: number;
  /** next available index the device should process (SET_VRING_BASE) */
  readonly base: number;
}

/** Hooks into `startDevice` for race tests. */
export interface StartHooks {
  /** runs after the rings are set up (kick fds sent) and before any SET_VRING_ENABLE */
  readonly beforeEnable?: () => void;
}

/** Picks the protocol features to ack among those offered, given the profile's set. */
export type ProtocolFeatureChooser = (profileFeatures: bigint) => bigint;
