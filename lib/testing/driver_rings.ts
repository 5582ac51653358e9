/**
 * One virtqueue's driver side laid out in guest RAM, split (virtio 1.3 section 2.7,
 * `compactRingLayout`) or packed (section 2.8, VIRTIO_F_RING_PACKED, `compactPackedRingLayout`),
 * and the VMM's description of it (`QueueSetup`): the three addresses SET_VRING_ADDR carries
 * (split: descriptor table, available ring, used ring; packed: descriptor ring, driver event
 * suppression, device event suppression) and the SET_VRING_BASE of a fresh ring (split 0;
 * packed `PACKED_RING_START_BASE`: both indices 0, both wrap counters 1). Shared by the testing
 * guest (guest_rings.ts) and the bench's guest (tests/bench/lean_rings.ts).
 */

import {
  featureMask,
  VIRTIO_F_RING_PACKED,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../virtio/features.ts";
import type { GuestMemory } from "../virtio/memory.ts";
import {
  compactPackedRingLayout,
  offWrap,
  PACKED_OFFSET_MASK,
  PACKED_WRAP_BIT,
  parsePackedRingBase,
} from "../virtio/packed_layout.ts";
import { compactRingLayout } from "../virtio/split_layout.ts";
import { DriverPackedQueue, PACKED_RING_START_BASE } from "./driver_packed_queue.ts";
import { type DriverQueue, DriverSplitQueue } from "./driver_queue.ts";
import type { QueueSetup } from "./vmm_profile.ts";

/** Either driver queue, told apart by `packed` (for the raw, layout-specific helpers). */
export type AnyDriverQueue = DriverSplitQueue | DriverPackedQueue;

/** The ring features a driver acked. */
export interface RingFeatures {
  /** VIRTIO_F_RING_PACKED */
  readonly packed: boolean;
  /** VIRTIO_RING_F_EVENT_IDX */
  readonly eventIdx: boolean;
  /** VIRTIO_RING_F_INDIRECT_DESC */
  readonly indirect: boolean;
}

/** The ring features in a virtio feature word. */
export function ringFeatures(features: bigint): RingFeatures {
  const has = (bit: number) => (features & featureMask(bit)) !== 0n;
  return {
    packed: has(VIRTIO_F_RING_PACKED),
    eventIdx: has(VIRTIO_RING_F_EVENT_IDX),
    indirect: has(VIRTIO_RING_F_INDIRECT_DESC),
  };
}

/** A laid-out ring: its driver queue, its description for the VMM, and its RAM block. */
export interface DriverRing {
  readonly queue: AnyDriverQueue;
  readonly setup: QueueSetup;
  /** the guest-physical block `alloc` returned (free it to release the ring) */
  readonly block: number;
}

/**
 * Lays out virtqueue `index` of `size` entries in one page-aligned block from `alloc`
 * (`GuestRam.alloc`), split or packed as `f` says.
 */
export function allocDriverRing(
  mem: GuestMemory,
  alloc: (bytes: number, align: number) => number,
  index: number,
  size: number,
  f: Pick<RingFeatures, "packed" | "eventIdx">,
): DriverRing {
  const eventIdx = f.eventIdx;
  if (f.packed) {
    const block = alloc(compactPackedRingLayout(size, 0).end, 4096);
    const l = compactPackedRingLayout(size, block);
    const queue = new DriverPackedQueue(mem, size, l.descGpa, l.driverEventGpa, l.deviceEventGpa, {
      eventIdx,
    });
    const setup: QueueSetup = {
      index,
      size,
      packed: true,
      descGpa: l.descGpa,
      availGpa: l.driverEventGpa,
      usedGpa: l.deviceEventGpa,
      base: PACKED_RING_START_BASE,
    };
    return { queue, setup, block };
  }
  const block = alloc(compactRingLayout(size, 0, true).end, 4096);
  const l = compactRingLayout(size, block, true);
  const queue = new DriverSplitQueue(mem, size, l.descGpa, l.availGpa, l.usedGpa, { eventIdx });
  const setup: QueueSetup = {
    index,
    size,
    descGpa: l.descGpa,
    availGpa: l.availGpa,
    usedGpa: l.usedGpa,
    base: 0,
  };
  return { queue, setup, block };
}

/**
 * The avail position in a vring base (GET_VRING_BASE / SET_VRING_BASE), comparable with
 * `q.availIdx`: a split ring's base is its next avail index; a packed ring's carries the next
 * avail index and wrap counter in bits 0-15 (`parsePackedRingBase`), an off_wrap word.
 */
export function baseAvailIdx(q: DriverQueue, base: number): number {
  if (!q.packed) return base;
  const b = parsePackedRingBase(base);
  return offWrap(b.availIdx, b.availWrap);
}

/** A queue position for messages: a split ring's index as is, a packed off_wrap as "slot/wrap". */
export function describePosition(q: DriverQueue, pos: number): string {
  if (!q.packed) return String(pos);
  return `${pos & PACKED_OFFSET_MASK}/${(pos & PACKED_WRAP_BIT) !== 0 ? 1 : 0}`;
}

/**
 * The used position in a packed ring's vring base (bits 16-31), comparable with
 * `q.readUsedIdx()`; a split ring's base has none (throws).
 */
export function baseUsedIdx(q: DriverQueue, base: number): number {
  if (!q.packed) throw new Error("a split ring's vring base carries no used index");
  const b = parsePackedRingBase(base);
  return offWrap(b.usedIdx, b.usedWrap);
}
