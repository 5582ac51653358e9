/**
 * Unit tests of the isolation pieces: the shared-memory sibling ring (order, wrap-around,
 * full ring, blocked delivery, wake-up rule), the watchdog's heartbeat reading, the restart
 * back-off and the death line, and the sharding of VMs over workers.
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import { HeartbeatWatch } from "../../lib/watchdog.ts";
import {
  describeExit,
  RESTART_DELAY_MAX_MS,
  restartDelayMs,
} from "../../lib/process_supervisor.ts";
import { ringBytes, SiblingRing } from "../../lib/sibling_ring.ts";
import type { SiblingPacket } from "../../lib/vsock/sibling_hub.ts";
import { shardsShareGroup, shardVms, workerName } from "../../lib/worker_plan.ts";
import { parseVmSpec } from "../../lib/config.ts";

function packet(seq: number, len: number): SiblingPacket {
  const payload = len > 0 ? new Uint8Array(len).map((_, i) => (seq + i) & 0xff) : null;
  return {
    srcCid: 3,
    dstCid: 4,
    srcPort: seq,
    dstPort: 7000,
    type: 1,
    op: 5,
    flags: seq & 3,
    bufAlloc: 65536,
    fwdCnt: seq * 10,
    payload,
    offset: 0,
  };
}

function ringPair(capacity = 4096) {
  const buf = new ArrayBuffer(ringBytes(capacity));
  return {
    producer: new SiblingRing(buf, 0, capacity, "producer"),
    consumer: new SiblingRing(buf, 0, capacity, "consumer"),
  };
}

Deno.test("sibling ring: records come out in order, whole, across many wrap-arounds", () => {
  fc.assert(fc.property(fc.array(fc.integer({ min: 0, max: 1500 }), { maxLength: 300 }), (lens) => {
    const { producer, consumer } = ringPair();
    const got: SiblingPacket[] = [];
    let next = 0;
    for (const len of lens) {
      if (producer.push(packet(next, len)) === 0) {
        consumer.drain((p) => (got.push(p), true));
        assert.notEqual(producer.push(packet(next, len)), 0, "an empty ring takes a record");
      }
      next++;
    }
    consumer.drain((p) => (got.push(p), true));
    assert.equal(got.length, lens.length);
    got.forEach((p, i) => {
      const want = packet(i, lens[i]);
      assert.deepEqual({ ...p, payload: p.payload && [...p.payload] }, {
        ...want,
        payload: want.payload && [...want.payload],
      });
    });
  }));
});

Deno.test("sibling ring: a full ring refuses, a refused delivery stays, the wake-up rule", () => {
  const { producer, consumer } = ringPair();
  assert.equal(producer.push(packet(0, 100)), 2, "empty ring: the consumer may sleep, wake it");
  assert.equal(producer.push(packet(1, 100)), 1, "consumer behind: no wake-up needed");
  let n = 0;
  while (producer.push(packet(2 + n, 1000)) !== 0) n++;
  assert.ok(n >= 2 && producer.used <= 4096);
  assert.equal(producer.push(packet(99, 2048 + 1)), 0, "larger than half the ring: never");
  let seen = 0;
  assert.equal(consumer.drain(() => seen++ < 1), "blocked");
  assert.equal(seen, 2);
  const order: number[] = [];
  assert.equal(consumer.drain((p) => (order.push(p.srcPort), true)), "empty");
  assert.deepEqual(order, Array.from({ length: n + 1 }, (_, i) => i + 1));
  assert.equal(producer.push(packet(50, 0)), 2, "caught up: wake it again");
});

Deno.test("watchdog: idle in epoll_wait is healthy; an unchanged even count is stuck, once", () => {
  const cells = new Int32Array(16);
  const w = new HeartbeatWatch(cells, 0, 100);
  cells[0] = 1; // waiting
  assert.equal(w.sample(0), "ok");
  assert.equal(w.sample(10_000), "ok", "idle for long is fine");
  cells[0] = 2; // running a batch
  assert.equal(w.sample(10_000), "ok");
  assert.equal(w.sample(10_050), "ok");
  assert.equal(w.sample(10_100), "stuck");
  assert.equal(w.sample(10_500), "ok", "reported once");
  cells[0] = 3;
  assert.equal(w.sample(10_600), "recovered");
});

Deno.test("restart back-off: at once, then doubling up to the cap; the death line", () => {
  assert.equal(restartDelayMs(1), 0);
  assert.ok(restartDelayMs(3) === 2 * restartDelayMs(2) && restartDelayMs(2) > 0);
  assert.equal(restartDelayMs(40), RESTART_DELAY_MAX_MS);
  assert.equal(
    describeExit({ success: false, code: 135, signal: "SIGBUS" }),
    "killed by SIGBUS (exit 135)",
  );
  assert.equal(describeExit({ success: false, code: 1, signal: null }), "exited with status 1");
});

Deno.test("sharding: VM i goes to worker i mod N; links only where groups meet", () => {
  const vms = [3, 4, 5, 6, 7].map((c) =>
    parseVmSpec(`guest-cid=${c},groups=${c === 7 ? "x" : "g"}`)
  );
  const shards = shardVms(vms, 2);
  assert.deepEqual(shards.map((s) => s.map((v) => v.guestCid)), [[3, 5, 7], [4, 6]]);
  assert.equal(shardsShareGroup(shards[0], shards[1]), true);
  assert.equal(shardsShareGroup([vms[4]], [vms[0]]), false);
  assert.equal(workerName(1, shards[1]), "worker 1 (CIDs 4, 6)");
  assert.equal(workerName(0, [vms[0]]), "worker 0 (CID 3)");
});
