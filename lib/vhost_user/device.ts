/**
 * The contract between the vhost-user back end (which speaks the protocol,
 * maps memory and runs the vrings' lifecycle) and a virtio device (vsock here).
 *
 * The back end knows nothing of vsock. It tells the device:
 * - which features the driver acked,
 * - when a queue becomes *active* (started AND enabled, with a validated ring
 *   in mapped memory) and when it stops being active,
 * - when an active queue is kicked,
 * - when the whole device resets (front end gone, RESET_DEVICE, driver reset).
 * The device answers config-space reads and may save/load its state.
 */
import type { VirtQueue } from "../virtio/virtqueue.ts";
import type { Reactor } from "../reactor.ts";

/** How a device signals the driver for one queue (the vring's call eventfd). */
export interface QueueNotifier {
  /** writes the call eventfd (no-op while the ring has none) */
  notify(): void;
}

/** An active queue handed to the device. */
export interface ActiveQueue {
  readonly index: number;
  readonly queue: VirtQueue;
  readonly notifier: QueueNotifier;
}

/** Why the device is reset. */
export type ResetReason = "front-end-disconnected" | "reset-device" | "driver-reset";

export interface VirtioDevice {
  /** for logs */
  readonly name: string;
  /** queues the device has (GET_QUEUE_NUM) */
  readonly maxQueues: number;
  /** largest queue size the device accepts */
  readonly maxQueueSize: number;
  /** virtio feature bits the device offers (VERSION_1, EVENT_IDX, device bits...) */
  readonly features: bigint;
  /** extra vhost-user protocol features the device supports (e.g. CONFIG, DEVICE_STATE) */
  readonly protocolFeatures: bigint;

  /** the reactor all callbacks run on */
  attach(reactor: Reactor): void;
  /** the driver's acked virtio features (SET_FEATURES) */
  setFeatures(acked: bigint): void;
  /** config space read (GET_CONFIG); null = refused */
  readConfig(offset: number, size: number): Uint8Array | null;
  /** queue `index` is now started and enabled */
  queueActive(q: ActiveQueue): void;
  /** queue `index` stopped or was disabled: the device must not touch it any more */
  queueInactive(index: number): void;
  /** the front end set up queue `index` (SET_VRING_ADDR): it hands that queue to us */
  queueConfigured?(index: number): void;
  /** an active queue's kick fd fired */
  queueKicked(index: number): void;
  /** every queue is inactive and the device must forget its guest-facing state */
  reset(reason: ResetReason): void;
  /** DEVICE_STATE: serialize state while stopped */
  saveState?(): Uint8Array;
  /** DEVICE_STATE: load state; throws with a clear message on bad input */
  loadState?(state: Uint8Array): void;
  /** the process is shutting down */
  dispose(): void;
}
