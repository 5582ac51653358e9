/**
 * The split virtqueue under test in the unit tests of lib/virtio/split_queue.ts and
 * desc_chain.ts: a device-side SplitQueue and the testing library's DriverSplitQueue over one
 * PlainGuestMemory (two adjacent regions, a gap, a third region), dirty marks recorded; segment
 * shorthands; and a GuestMemory over caller-built regions (huge sparse regions, non-zero
 * hostAddr).
 */

import { type DriverSegment, DriverSplitQueue } from "../../lib/testing/driver_queue.ts";
import { DescChain } from "../../lib/virtio/desc_chain.ts";
import {
  findRegion,
  type GuestMemory,
  type MemRegion,
  PlainGuestMemory,
} from "../../lib/virtio/memory.ts";
import { compactRingLayout } from "../../lib/virtio/split_layout.ts";
import { SplitQueue } from "../../lib/virtio/split_queue.ts";

// Memory map used by most tests: two adjacent regions, a gap, a third region.
export const R0 = { gpa: 0x0, size: 0x10000 };
export const R1 = { gpa: 0x10000, size: 0x10000 };
export const R2 = { gpa: 0x40000, size: 0x1000 };
export const RING_BASE = 0x0;
export const BUF = 0x2000; // buffers from here on in R0
export const TABLE = 0x8000; // indirect tables from here on in R0

export interface Setup {
  mem: PlainGuestMemory;
  dirty: [number, number][];
  drv: DriverSplitQueue;
  dev: SplitQueue;
  chain: DescChain;
}

/** A fresh queue pair (size 8, no features unless asked) over the memory map above. */
export function setup(
  opts: {
    size?: number;
    eventIdx?: boolean;
    indirect?: boolean;
    notifyOnEmpty?: boolean;
    startIdx?: number;
    maxIndirectDescs?: number;
    capacity?: number;
    /** called after each dirty mark is recorded (e.g. to act as the driver at that moment) */
    onDirty?: (gpa: number, len: number) => void;
  } = {},
): Setup {
  const size = opts.size ?? 8;
  const eventIdx = opts.eventIdx ?? false;
  const dirty: [number, number][] = [];
  const mem = new PlainGuestMemory([R0, R1, R2], (gpa, len) => {
    dirty.push([gpa, len]);
    opts.onDirty?.(gpa, len);
  });
  const l = compactRingLayout(size, RING_BASE, eventIdx);
  const drv = new DriverSplitQueue(mem, size, l.descGpa, l.availGpa, l.usedGpa, {
    eventIdx,
    startIdx: opts.startIdx,
  });
  const dev = new SplitQueue(size, mem, l.descGpa, l.availGpa, l.usedGpa, {
    eventIdx,
    indirect: opts.indirect ?? false,
    notifyOnEmpty: opts.notifyOnEmpty,
    maxIndirectDescs: opts.maxIndirectDescs,
  });
  dev.lastAvail = opts.startIdx ?? 0;
  return { mem, dirty, drv, dev, chain: new DescChain(opts.capacity ?? 64) };
}

/** A device-readable (rd) or device-writable (wr) buffer for the driver to post. */
export const rd = (gpa: number, len: number): DriverSegment => ({ gpa, len, writable: false });
export const wr = (gpa: number, len: number): DriverSegment => ({ gpa, len, writable: true });

/** The segments of a popped chain as (region, offset, len). */
export function segments(c: DescChain): [number, number, number][] {
  const out: [number, number, number][] = [];
  for (let i = 0; i < c.count; i++) out.push([c.region[i], c.offset[i], c.len[i]]);
  return out;
}

/** GuestMemory over caller-built regions (huge sparse regions, non-zero hostAddr). */
export class FakeMemory implements GuestMemory {
  constructor(readonly regions: MemRegion[]) {}
  regionOf(gpa: number, len: number): number {
    return findRegion(this.regions, gpa, len);
  }
  markDirty(): void {}
}

/** A region of `size` bytes at `gpa` over `backing` bytes (fewer: a sparse region never read). */
export function fakeRegion(gpa: number, size: number, backing: number, hostAddr = 0): MemRegion {
  const buf = new ArrayBuffer(backing);
  return { gpa, size, bytes: new Uint8Array(buf), view: new DataView(buf), hostAddr };
}
