/**
 * The testing guest's rings (guest_rings.ts) and the VMM's own event queue (the qemu profile's
 * event injection) over packed virtqueues, against the tiny packed device of packed_device.ts:
 * the set-up handed to the VMM (driver_rings.ts), rx and event buffers posted, a tx packet
 * through an indirect table, rx delivery, a raw chain returned to `rawUsed`, and TRANSPORT_RESET
 * events injected across wraps with the vring base carried in vhost-user's packed encoding.
 */

import assert from "node:assert/strict";
import { PACKED_RING_START_BASE } from "../../lib/testing/driver_packed_queue.ts";
import { allocDriverRing, baseAvailIdx, baseUsedIdx } from "../../lib/testing/driver_rings.ts";
import { GuestRam } from "../../lib/testing/guest_ram.ts";
import { GuestRings } from "../../lib/testing/guest_rings.ts";
import { newGuestStats } from "../../lib/testing/guest_types.ts";
import { qemuInjectEvent } from "../../lib/testing/profile_qemu.ts";
import {
  featureMask,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../../lib/virtio/features.ts";
import {
  compactPackedRingLayout,
  offWrap,
  PACKED_EVENT_SIZE,
  parsePackedRingBase,
  VIRTQ_DESC_F_NEXT,
} from "../../lib/virtio/packed_layout.ts";
import {
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_OP_RW,
  VSOCK_VQ_EVENT,
  VSOCK_VQ_RX,
  VSOCK_VQ_TX,
} from "../../lib/vsock/constants.ts";
import { PacketHeader } from "../../lib/vsock/packet.ts";
import { TinyDevice } from "./packed_device.ts";

const FEATURES = featureMask(VIRTIO_F_VERSION_1) | featureMask(VIRTIO_F_RING_PACKED) |
  featureMask(VIRTIO_RING_F_INDIRECT_DESC) | featureMask(VIRTIO_RING_F_EVENT_IDX);

Deno.test("packed guest rings: set-up for the VMM, rx/event filled, tx through an indirect table, rx delivered, raw chains", () => {
  const ram = new GuestRam({ regions: [{ gpa: 0, size: 4 << 20 }] });
  try {
    const ctx = {
      memory: ram,
      opts: { rxBuffers: 4, txSlots: 4 },
      stats: newGuestStats(),
      anomalies: [] as string[],
      rawHeads: [new Set<number>(), new Set<number>(), new Set<number>()],
      rawUsed: [] as { queue: number; head: number; len: number }[],
    };
    const r = GuestRings.alloc(ctx, 8, FEATURES);
    assert.ok(r.packed && r.indirect);
    const devs = r.setups.map((s) => {
      assert.ok(s.packed);
      assert.equal(s.base, PACKED_RING_START_BASE);
      const l = compactPackedRingLayout(s.size, s.descGpa);
      assert.equal(s.availGpa, l.driverEventGpa, "avail address = driver event suppression");
      assert.equal(s.usedGpa, l.deviceEventGpa, "used address = device event suppression");
      return new TinyDevice(ram, s.size, { ...l, end: l.deviceEventGpa + PACKED_EVENT_SIZE });
    });
    r.fillQueues();
    const kicked: number[] = [];
    r.flush((i) => kicked.push(i));
    assert.deepEqual(kicked, [VSOCK_VQ_RX, VSOCK_VQ_EVENT]);
    const rx = devs[VSOCK_VQ_RX].takeAll();
    assert.equal(rx.length, 4);
    assert.ok(rx.every((t) => t.segs.length === 1 && t.segs[0].writable));
    assert.equal(devs[VSOCK_VQ_EVENT].takeAll().length, 8);

    // tx: header + 100 bytes in one slot with an indirect table
    const h = new PacketHeader();
    h.op = VIRTIO_VSOCK_OP_RW;
    h.dstPort = 7;
    const payload = new Uint8Array(100).fill(0x5a);
    assert.ok(r.hasTxRoom(100));
    assert.notEqual(r.putTx(h, payload, 0, 100), null);
    r.flush((i) => kicked.push(i));
    assert.equal(kicked.at(-1), VSOCK_VQ_TX);
    const [tx] = devs[VSOCK_VQ_TX].takeAll();
    assert.equal(tx.slots, 1);
    assert.deepEqual(tx.segs.map((s) => [s.len, s.writable]), [[44, false], [100, false]]);
    assert.deepEqual(ram.read(tx.segs[1].addr, 100), payload);
    devs[VSOCK_VQ_TX].use(tx, 0);
    assert.equal(r.reapTx(), 1);
    assert.equal(r.txFree.length, 4);

    // rx: the device writes a 10-byte packet into the second buffer it took
    const b = rx[1];
    const hdr = new Uint8Array(VIRTIO_VSOCK_HDR_SIZE);
    h.len = 10;
    h.encodeTo(new DataView(hdr.buffer), 0);
    ram.write(b.segs[0].addr, hdr);
    devs[VSOCK_VQ_RX].use(b, VIRTIO_VSOCK_HDR_SIZE + 10);
    const got: [number, number][] = [];
    assert.equal(r.reapRx((buf, len) => got.push([buf.gpa, len])), 1);
    assert.deepEqual(got, [[b.segs[0].addr, VIRTIO_VSOCK_HDR_SIZE + 10]]);
    assert.equal(r.rxPosted, 3);

    // a raw chain: two slots, returned to rawUsed rather than dispatched
    const raw = r.addRawChain(VSOCK_VQ_TX, [
      { addr: 0x1000, len: 44, flags: VIRTQ_DESC_F_NEXT },
      { addr: 0x2000, len: 1, flags: 0 },
    ]);
    r.dirty[VSOCK_VQ_TX] = true; // as VsockGuest.addRawChain does
    r.flush(() => {});
    const [t] = devs[VSOCK_VQ_TX].takeAll();
    assert.equal(t.id, raw);
    assert.equal(t.slots, 2);
    devs[VSOCK_VQ_TX].use(t, 0);
    r.reapTx();
    assert.deepEqual(ctx.rawUsed, [{ queue: VSOCK_VQ_TX, head: raw, len: 0 }]);
    assert.deepEqual(ctx.anomalies, []);
    const lines: string[] = [];
    r.describe(lines, false, 0);
    assert.match(lines[1], /tx: avail 3\/1 used 3\/1 reaped 3\/1/);
  } finally {
    ram.close();
  }
});

Deno.test("packed event queue: the VMM's event injection (qemu) reaped across wraps, bases in the packed encoding", () => {
  const ram = new GuestRam({ regions: [{ gpa: 0, size: 1 << 20 }] });
  try {
    const ring = allocDriverRing(ram, (n, a) => ram.alloc(n, a), 2, 4, {
      packed: true,
      eventIdx: true,
    });
    const q = ring.queue;
    const bufOf = new Map<number, number>();
    const post = (gpa: number) => bufOf.set(q.addBuffer([{ gpa, len: 4, writable: true }]), gpa);
    [0, 1, 2].map(() => ram.alloc(8, 8)).forEach(post);
    q.publish();
    let base = ring.setup.base;
    const events: number[] = [];
    for (let i = 0; i < 7; i++) {
      base = qemuInjectEvent(ram, ring.setup, base, 100 + i);
      q.drainUsed((id, len) => {
        assert.equal(len, 4);
        const gpa = bufOf.get(id)!;
        events.push(new DataView(ram.read(gpa, 4).buffer).getUint32(0, true));
        post(gpa); // virtio_vsock_event_fill_one: re-post at once
      });
      q.publish();
    }
    assert.deepEqual(events, [100, 101, 102, 103, 104, 105, 106]);
    // 7 single-slot buffers: both sides at slot 3 of the second lap (wrap 0)
    assert.deepEqual(parsePackedRingBase(base), {
      availIdx: 3,
      availWrap: 0,
      usedIdx: 3,
      usedWrap: 0,
    });
    assert.equal(baseUsedIdx(q, base), q.readUsedIdx());
    assert.equal(baseUsedIdx(q, base), q.lastUsed);
    assert.equal(baseAvailIdx(q, base), offWrap(3, 0));
    assert.equal(q.availIdx, offWrap(2, 1), "three buffers posted ahead");
    // nothing posted: the event is missed, as QEMU reports it
    const empty = allocDriverRing(ram, (n, a) => ram.alloc(n, a), 2, 4, {
      packed: true,
      eventIdx: false,
    });
    assert.throws(
      () => qemuInjectEvent(ram, empty.setup, empty.setup.base, 1),
      /posted no event buffer/,
    );
  } finally {
    ram.close();
  }
});
