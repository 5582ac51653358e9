/**
 * A packed ring through the vhost-user back end's request handlers (lib/vhost_user/
 * handlers_vring.ts, backend.ts): the back end, in this process on a socketpair, is driven
 * message by message with the testing library's channel, and a raw packed driver
 * (packed_raw_driver.ts) stands for the guest. SET_VRING_BASE keeps all 32 bits of a packed
 * ring's base (avail and used positions with their wrap counters, as QEMU's
 * virtio_queue_packed_get_last_avail_idx sends them), GET_VRING_BASE returns the position
 * the queue reached, a restart and a new memory table go on from there; a split ring keeps
 * the u16 and a power-of-2 size.
 */

import assert from "node:assert/strict";
import { close, eventFd, eventFdWrite, unixSocketPair } from "../../ffi/mod.ts";
import { Reactor } from "../../lib/reactor.ts";
import { GuestRam } from "../../lib/testing/guest_ram.ts";
import { VhostUserChannel } from "../../lib/testing/vhost_user_channel.ts";
import { VhostUserBackend } from "../../lib/vhost_user/backend.ts";
import type { ActiveQueue, VirtioDevice } from "../../lib/vhost_user/device.ts";
import {
  decodeVringState,
  encodeMemoryTable,
  encodeRequest,
  encodeU64,
  encodeVringAddr,
  encodeVringFd,
  encodeVringState,
} from "../../lib/vhost_user/messages.ts";
import { VhostUserRequest as R } from "../../lib/vhost_user/protocol.ts";
import { DescChain } from "../../lib/virtio/desc_chain.ts";
import {
  VIRTIO_F_RING_PACKED_MASK,
  VIRTIO_F_VERSION_1_MASK,
  VIRTIO_RING_F_EVENT_IDX_MASK,
} from "../../lib/virtio/features.ts";
import {
  compactPackedRingLayout,
  type PackedRingAddrs,
  packedRingBase,
} from "../../lib/virtio/packed_layout.ts";
import { PackedQueue } from "../../lib/virtio/packed_queue.ts";
import { SplitQueue } from "../../lib/virtio/split_queue.ts";
import { POP_CHAIN } from "../../lib/virtio/virtqueue.ts";
import { RawPackedDriver, wr } from "./packed_raw_driver.ts";

/** A one-queue device that returns every buffer it is kicked for, with used len 0. */
class ReturningDevice implements VirtioDevice {
  readonly name = "packed-test";
  readonly maxQueues = 1;
  readonly maxQueueSize = 256;
  readonly features = VIRTIO_F_VERSION_1_MASK | VIRTIO_RING_F_EVENT_IDX_MASK |
    VIRTIO_F_RING_PACKED_MASK;
  readonly protocolFeatures = 0n;
  active: ActiveQueue | null = null;
  readonly returned: number[] = [];
  readonly #chain = new DescChain(16);

  attach(): void {}
  setFeatures(): void {}
  readConfig(): Uint8Array | null {
    return null;
  }
  queueActive(q: ActiveQueue): void {
    this.active = q;
  }
  queueInactive(): void {
    this.active = null;
  }
  queueKicked(): void {
    const q = this.active!.queue;
    while (q.pop(this.#chain) === POP_CHAIN) {
      this.returned.push(this.#chain.head);
      q.pushUsed(this.#chain.head, 0);
    }
    q.publishUsed();
  }
  reset(): void {
    this.active = null;
  }
  dispose(): void {}
}

/** The back end on one end of a socketpair, the test as its front end on the other. */
class Harness {
  readonly reactor = new Reactor();
  readonly device = new ReturningDevice();
  readonly backend: VhostUserBackend;
  readonly channel: VhostUserChannel;
  readonly ram = new GuestRam({ regions: [{ gpa: 0, size: 0x10000 }] });
  readonly kick = eventFd();

  constructor() {
    const [ours, theirs] = unixSocketPair();
    this.backend = new VhostUserBackend(this.reactor, this.device, { listenFd: theirs });
    this.backend.listen(); // a connected socket: served at once
    this.channel = new VhostUserChannel(ours, 2000);
  }

  /** Sends one request and lets the back end handle it. */
  send(req: number, payload: Uint8Array = new Uint8Array(0), fds: number[] = []): void {
    this.channel.send(encodeRequest(req, payload), fds, req);
    while (this.reactor.runOnce(0) > 0) { /* handle everything queued */ }
  }

  setMemTable(): void {
    const r = this.ram.regions[0];
    const table = {
      regions: [{ guestAddr: r.gpa, size: r.size, userAddr: r.hostAddr, mmapOffset: 0 }],
    };
    this.send(R.SET_MEM_TABLE, encodeMemoryTable(table), [r.fd]);
  }

  setVringAddr(ring: PackedRingAddrs): void {
    const m = this.ram;
    this.send(
      R.SET_VRING_ADDR,
      encodeVringAddr({
        index: 0,
        flags: 0,
        descUser: m.gpaToUser(ring.descGpa),
        availUser: m.gpaToUser(ring.driverEventGpa),
        usedUser: m.gpaToUser(ring.deviceEventGpa),
        logGuestAddr: 0n,
      }),
    );
  }

  startRing(): void {
    this.send(R.SET_VRING_KICK, encodeVringFd({ index: 0, noFd: false }), [this.kick]);
  }

  /** GET_VRING_BASE: stops the ring; the 32-bit num of the reply. */
  getVringBase(): number {
    this.send(R.GET_VRING_BASE, encodeVringState({ index: 0, num: 0 }));
    const reply = this.channel.readReply(R.GET_VRING_BASE, 1000);
    const state = decodeVringState(reply.payload);
    if (state instanceof Error) throw state;
    return state.num;
  }

  close(): void {
    this.backend.close();
    this.channel.close();
    this.reactor.close();
    this.ram.close();
    close(this.kick);
  }
}

Deno.test("packed vring base: SET_VRING_BASE keeps 32 bits, GET_VRING_BASE returns the position reached, restarts and new memory tables go on", () => {
  const h = new Harness();
  try {
    h.send(R.SET_FEATURES, encodeU64(VIRTIO_F_VERSION_1_MASK | VIRTIO_F_RING_PACKED_MASK));
    h.setMemTable();
    h.send(R.SET_VRING_NUM, encodeVringState({ index: 0, num: 5 })); // packed: any size
    assert.equal(h.backend.vrings[0].num, 5);
    const ring = compactPackedRingLayout(5, 0x1000);
    const drv = new RawPackedDriver(h.ram, 5, ring);
    // The guest is at avail 3 / used 3 of a lap with wrap counters 0.
    drv.nextAvail = drv.nextUsed = 3;
    drv.availWrap = drv.usedWrap = 0;
    const start = packedRingBase({ availIdx: 3, availWrap: 0, usedIdx: 3, usedWrap: 0 });
    h.send(R.SET_VRING_BASE, encodeVringState({ index: 0, num: start }));
    assert.equal(h.backend.vrings[0].base, start);
    h.setVringAddr(ring);
    drv.add(2, [wr(0x4000, 64), wr(0x4100, 64)]); // positions 3, 4
    drv.add(4, [wr(0x4200, 64)]); // position 0 of the next lap (wrap 1)
    h.startRing(); // active (no PROTOCOL_FEATURES: enabled) and processed at once
    const q = h.device.active?.queue;
    assert.ok(q instanceof PackedQueue, "a packed queue for a packed ring");
    assert.deepEqual(h.device.returned, [2, 4]);
    assert.equal(drv.getUsed()?.id, 2);
    assert.equal(drv.getUsed()?.id, 4);
    const reached = packedRingBase({ availIdx: 1, availWrap: 1, usedIdx: 1, usedWrap: 1 });
    assert.equal(h.getVringBase(), reached);
    assert.equal(h.device.active, null, "GET_VRING_BASE stops the ring");

    // Restart from that base (as QEMU does after a stop): the queue goes on from there.
    h.send(R.SET_VRING_BASE, encodeVringState({ index: 0, num: reached }));
    drv.add(0, [wr(0x4300, 64)]); // position 1, wrap 1
    h.startRing();
    assert.deepEqual(h.device.returned, [2, 4, 0]);
    assert.equal(drv.getUsed()?.id, 0);

    // A new memory table rebuilds the queue where it was.
    const before = h.device.active!.queue;
    h.setMemTable();
    const after = h.device.active!.queue;
    assert.notEqual(after, before, "rebuilt over the new mappings");
    assert.equal(after.ringBase, before.ringBase);
    drv.add(1, [wr(0x4400, 64), wr(0x4500, 8)]); // positions 2, 3
    eventFdWrite(h.kick);
    while (h.reactor.runOnce(0) > 0) { /* the kick */ }
    assert.deepEqual(h.device.returned, [2, 4, 0, 1]);
    assert.equal(drv.getUsed()?.id, 1);
    assert.equal(
      h.getVringBase(),
      packedRingBase({ availIdx: 4, availWrap: 1, usedIdx: 4, usedWrap: 1 }),
    );
  } finally {
    h.close();
  }
});

Deno.test("split vring base: without RING_PACKED the base is a u16 and sizes are powers of 2", () => {
  const h = new Harness();
  try {
    h.send(R.SET_FEATURES, encodeU64(VIRTIO_F_VERSION_1_MASK));
    h.setMemTable();
    h.send(R.SET_VRING_NUM, encodeVringState({ index: 0, num: 5 }));
    assert.equal(h.backend.vrings[0].num, 0, "5 refused for a split ring");
    h.send(R.SET_VRING_NUM, encodeVringState({ index: 0, num: 8 }));
    h.send(R.SET_VRING_BASE, encodeVringState({ index: 0, num: 0x0003_0007 }));
    assert.equal(h.backend.vrings[0].base, 7);
    h.send(
      R.SET_VRING_ADDR,
      encodeVringAddr({
        index: 0,
        flags: 0,
        descUser: h.ram.gpaToUser(0x1000),
        availUser: h.ram.gpaToUser(0x2000),
        usedUser: h.ram.gpaToUser(0x3000),
        logGuestAddr: 0n,
      }),
    );
    h.startRing();
    assert.ok(h.device.active?.queue instanceof SplitQueue);
    assert.equal(h.getVringBase(), 7);
  } finally {
    h.close();
  }
});
