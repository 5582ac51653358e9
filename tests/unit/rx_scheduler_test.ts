/**
 * The RX scheduler's deficit round robin, with fake flows: bytes per flow stay even whatever
 * the packet sizes, weights scale shares, a waiting flow gets a buffer within one round, a
 * buffer nobody can use visits each flow once, and orphan RSTs keep their order.
 */
import assert from "node:assert/strict";
import { DescChain } from "../../lib/virtio/desc_chain.ts";
import { PlainGuestMemory } from "../../lib/virtio/memory.ts";
import { VIRTIO_VSOCK_HDR_SIZE } from "../../lib/vsock/constants.ts";
import { RX_QUANTUM, type RxFlow, RxScheduler } from "../../lib/vsock/rx_scheduler.ts";

/** A flow that always has packets of `size` payload bytes (clipped to the buffer). */
class FakeFlow implements RxFlow {
  inRxQueue = false;
  deficit = 0;
  sent = 0;
  packets = 0;
  constructor(
    readonly name: string,
    readonly size: number,
    public left = Infinity,
    readonly weight = 1,
  ) {}
  get done(): boolean {
    return this.left <= 0;
  }
  hasRxWork(): boolean {
    return this.left > 0;
  }
  canSendInto(room: number): boolean {
    return this.size === 0 || room > 0;
  }
  fillRx(chain: DescChain): number {
    const n = Math.min(this.size, chain.writableLen - VIRTIO_VSOCK_HDR_SIZE);
    this.sent += n;
    this.packets++;
    this.left--;
    return VIRTIO_VSOCK_HDR_SIZE + n;
  }
}

const mem = new PlainGuestMemory([{ gpa: 0, size: 1 << 20 }]);
function buffer(size: number): DescChain {
  const c = new DescChain(1);
  c.reset(mem, 0);
  c.region[0] = 0;
  c.offset[0] = 0;
  c.len[0] = size;
  c.count = 1;
  c.writableLen = size;
  return c;
}

Deno.test("DRR: flows share the rx queue by buffers taken: 1 KiB datagrams get no more buffers than 4 KiB stream packets", () => {
  const s = new RxScheduler();
  const bulk = new FakeFlow("bulk", 4096);
  const flood = new FakeFlow("flood", 1024);
  s.schedule(bulk);
  s.schedule(flood);
  const buf = buffer(4096 + VIRTIO_VSOCK_HDR_SIZE); // Linux's rx buffers
  for (let i = 0; i < 4000; i++) assert.ok(s.fill(buf) > 0);
  // Counting bytes carried instead would give the flood four buffers for each of the bulk's.
  const ratio = bulk.packets / flood.packets;
  assert.ok(ratio > 0.9 && ratio < 1.1, `buffers bulk/flood ${ratio.toFixed(2)}`);
});

Deno.test("DRR: a bulk flow and one of 100-byte packets alternate over 64 KiB buffers", () => {
  const s = new RxScheduler();
  const bulk = new FakeFlow("bulk", 65536);
  const small = new FakeFlow("small", 100);
  s.schedule(bulk);
  s.schedule(small);
  const buf = buffer(65536 + VIRTIO_VSOCK_HDR_SIZE);
  for (let i = 0; i < 2000; i++) assert.ok(s.fill(buf) > 0);
  assert.ok(Math.abs(bulk.packets - small.packets) <= 2, `${bulk.packets} / ${small.packets}`);
});

Deno.test("DRR: an interactive flow waits at most one quantum per other busy flow", () => {
  const s = new RxScheduler();
  const bulks = [1, 2, 3, 4].map((i) => new FakeFlow(`bulk${i}`, 4096));
  for (const b of bulks) s.schedule(b);
  const buf = buffer(4096 + VIRTIO_VSOCK_HDR_SIZE);
  for (let i = 0; i < 37; i++) s.fill(buf); // somewhere in the middle of the bulk rounds
  const ping = new FakeFlow("ping", 64, 1);
  s.schedule(ping);
  let waited = 0;
  while (ping.packets === 0) {
    s.fill(buf);
    waited++;
  }
  // One quantum is RX_QUANTUM bytes: this many 4 KiB packets per bulk flow and round.
  const perTurn = Math.ceil(RX_QUANTUM / (4096 + VIRTIO_VSOCK_HDR_SIZE));
  assert.ok(waited <= bulks.length * perTurn + 1, `the ping waited ${waited} buffers`);
});

Deno.test("DRR: weights scale a flow's share", () => {
  const s = new RxScheduler();
  const heavy = new FakeFlow("heavy", 4096, Infinity, 3);
  const light = new FakeFlow("light", 4096, Infinity, 1);
  s.schedule(heavy);
  s.schedule(light);
  const buf = buffer(4096 + VIRTIO_VSOCK_HDR_SIZE);
  for (let i = 0; i < 4000; i++) s.fill(buf);
  const ratio = heavy.sent / light.sent;
  assert.ok(ratio > 2.7 && ratio < 3.3, `heavy/light ${ratio.toFixed(2)}`);
  assert.equal(RX_QUANTUM, 65536 + VIRTIO_VSOCK_HDR_SIZE);
});

Deno.test("DRR: a buffer nobody can use visits each flow once; they keep their order", () => {
  const s = new RxScheduler();
  const flows = [new FakeFlow("a", 100), new FakeFlow("b", 200), new FakeFlow("c", 300)];
  for (const f of flows) s.schedule(f);
  assert.equal(s.fill(buffer(VIRTIO_VSOCK_HDR_SIZE)), -1);
  assert.equal(s.queuedFlows, 3);
  assert.ok(flows.every((f) => f.inRxQueue && f.packets === 0));
  // A header-only flow behind them can use it.
  const ctl = new FakeFlow("ctl", 0, 1);
  s.schedule(ctl);
  assert.equal(s.fill(buffer(VIRTIO_VSOCK_HDR_SIZE)), VIRTIO_VSOCK_HDR_SIZE);
  assert.equal(ctl.packets, 1);
  // Then a real buffer goes to the first of them, in order.
  s.fill(buffer(4096));
  assert.equal(flows[0].packets, 1);
});

Deno.test("orphan RSTs come out oldest first and are bounded", () => {
  const s = new RxScheduler();
  for (let i = 0; i < 5; i++) s.addOrphan({ localPort: i, peerPort: i, srcCid: 2, type: 1 });
  assert.deepEqual([0, 1, 2, 3, 4].map(() => s.nextOrphan()!.localPort), [0, 1, 2, 3, 4]);
  assert.equal(s.nextOrphan(), undefined);
  let added = 0;
  while (s.addOrphan({ localPort: 0, peerPort: 0, srcCid: 2, type: 1 })) added++;
  assert.equal(added, 1024);
  assert.ok(s.orphansFull);
});

Deno.test("DRR: when every flow is paying back an overdraft, rounds go on until one may send", () => {
  const s = new RxScheduler();
  const flows = [new FakeFlow("a", 65536), new FakeFlow("b", 65536)];
  for (const f of flows) s.schedule(f);
  const buf = buffer(65536 + VIRTIO_VSOCK_HDR_SIZE);
  // Each send overdraws by ~60 KiB; a buffer must still be filled every time, never -1.
  for (let i = 0; i < 100; i++) assert.ok(s.fill(buf) > 0, `buffer ${i} left unfilled`);
  assert.equal(flows[0].packets + flows[1].packets, 100);
  assert.ok(Math.abs(flows[0].packets - flows[1].packets) <= 1);
});

Deno.test("DRR: a flow that arrives idle is served before the busy flows (sparse flow first)", () => {
  const s = new RxScheduler();
  const bulks = [1, 2, 3, 4].map((i) => new FakeFlow(`bulk${i}`, 4096));
  for (const b of bulks) s.schedule(b);
  const buf = buffer(4096 + VIRTIO_VSOCK_HDR_SIZE);
  // Past every bulk flow's first quantum, somewhere in the middle of a round.
  for (let i = 0; i < 4 * 16 + 37; i++) s.fill(buf);
  const ping = new FakeFlow("ping", 64, 1);
  s.schedule(ping);
  s.fill(buf);
  assert.equal(ping.packets, 1, "the ping's packet went into the very next buffer");
});

Deno.test("DRR: a flow that wakes up after every packet cannot starve a busy flow", () => {
  const s = new RxScheduler();
  const bulk = new FakeFlow("bulk", 4096);
  /** Never gone: between its packets it is merely idle. */
  class ChattyFlow extends FakeFlow {
    override get done(): boolean {
      return false;
    }
  }
  const chatty = new ChattyFlow("chatty", 4096, 1);
  s.schedule(bulk);
  s.schedule(chatty);
  const buf = buffer(4096 + VIRTIO_VSOCK_HDR_SIZE);
  for (let i = 0; i < 4000; i++) {
    s.fill(buf);
    // Each time it is served it has one more packet at once: it never stays idle a round.
    if (chatty.left === 0) chatty.left = 1;
    s.schedule(chatty);
  }
  // It has one packet at a time, so it is not owed a full quantum per round; what matters is
  // that its wake-ups never put it ahead of the busy flow every time (which would starve it).
  const share = bulk.sent / (bulk.sent + chatty.sent);
  assert.ok(share >= 0.5, `the busy flow got ${(100 * share).toFixed(0)} % of the buffers`);
});
