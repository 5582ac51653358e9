import assert from "node:assert/strict";
import fc from "fast-check";
import { Credit } from "../../lib/vsock/credit.ts";
import { CREDIT_UPDATE_THRESHOLD, DEFAULT_BUF_ALLOC } from "../../lib/vsock/constants.ts";
import { PacketHeader } from "../../lib/vsock/packet.ts";

const U32 = 2 ** 32;

Deno.test("peerFree follows peer_buf_alloc - (tx_cnt - peer_fwd_cnt)", () => {
  const c = new Credit();
  assert.equal(c.peerFree(), 0, "no credit before the peer's first header");
  c.updateFromPeer(1000, 0);
  assert.equal(c.peerFree(), 1000);
  c.consumeTx(600);
  assert.equal(c.txCnt, 600);
  assert.equal(c.peerInFlight(), 600);
  assert.equal(c.peerFree(), 400);
  assert.throws(() => c.consumeTx(401), RangeError);
  assert.equal(c.txCnt, 600, "a refused consumeTx changes nothing");
  c.consumeTx(400);
  assert.equal(c.peerFree(), 0);
  c.updateFromPeer(1000, 250);
  assert.equal(c.peerFree(), 250);
  c.updateFromPeer(2000, 250); // the peer grew its buffer
  assert.equal(c.peerFree(), 1250);
  c.updateFromPeer(500, 250); // ... and shrank it below what is in flight
  assert.equal(c.peerFree(), 0);
});

Deno.test("peerFree is 0 when the peer's fwd_cnt runs ahead of our tx_cnt", () => {
  const c = new Credit();
  c.updateFromPeer(4096, 10); // claims to have consumed 10 bytes we never sent
  assert.equal(c.peerInFlight(), U32 - 10);
  assert.equal(c.peerFree(), 0);
});

Deno.test("counters wrap at 2^32", () => {
  const c = new Credit(1 << 20);
  c.txCnt = U32 - 100;
  c.updateFromPeer(1000, U32 - 100);
  c.consumeTx(300);
  assert.equal(c.txCnt, 200);
  assert.equal(c.peerInFlight(), 300);
  assert.equal(c.peerFree(), 700);
  c.updateFromPeer(1000, 50); // peer fwd_cnt wrapped too
  assert.equal(c.peerFree(), 850);

  c.rxCnt = c.fwdCnt = c.lastSentFwdCnt = U32 - 5;
  assert.ok(c.onReceived(20));
  assert.equal(c.rxCnt, 15);
  assert.equal(c.buffered(), 20);
  c.onForwarded(20);
  assert.equal(c.fwdCnt, 15);
  assert.equal(c.buffered(), 0);
});

Deno.test("onReceived refuses payload beyond the credit we gave, recording nothing", () => {
  const c = new Credit(1000);
  assert.ok(c.onReceived(600));
  assert.ok(c.onReceived(400));
  assert.equal(c.onReceived(1), false);
  assert.equal(c.rxCnt, 1000);
  c.onForwarded(300);
  assert.ok(c.onReceived(300));
  assert.equal(c.onReceived(1), false);
});

Deno.test("shrinking bufAlloc keeps accepting what the older advertisement allowed", () => {
  const c = new Credit(1000);
  c.setBufAlloc(100);
  assert.ok(c.onReceived(1000), "the peer may not have seen the smaller buffer yet");
  assert.equal(c.onReceived(1), false);
  c.setBufAlloc(2000);
  assert.equal(c.rxLimit, 2000);
});

Deno.test("onForwarded beyond what was received throws", () => {
  const c = new Credit();
  assert.ok(c.onReceived(10));
  assert.throws(() => c.onForwarded(11), RangeError);
  c.onForwarded(10);
  assert.throws(() => c.onForwarded(1), RangeError);
});

Deno.test("non-u32 amounts are rejected", () => {
  const c = new Credit();
  c.updateFromPeer(100, 0);
  for (const bad of [-1, 1.5, NaN, U32]) {
    assert.throws(() => c.consumeTx(bad), RangeError);
    assert.throws(() => c.onReceived(bad), RangeError);
    assert.throws(() => c.onForwarded(bad), RangeError);
  }
  assert.throws(() => new Credit(-1), RangeError);
});

Deno.test("needsCreditUpdate fires once forwarding grew our free space by the threshold", () => {
  const c = new Credit(); // 256 KiB buffer, 64 KiB threshold
  assert.equal(c.effectiveThreshold(), CREDIT_UPDATE_THRESHOLD);
  assert.equal(c.needsCreditUpdate(), false, "the initial buf_alloc goes with the handshake");
  assert.ok(c.onReceived(DEFAULT_BUF_ALLOC));
  assert.equal(c.peerSeenFree(), 0);
  c.onForwarded(CREDIT_UPDATE_THRESHOLD - 1);
  assert.equal(c.needsCreditUpdate(), false);
  c.onForwarded(1);
  assert.equal(c.needsCreditUpdate(), true);

  const h = new PacketHeader();
  c.stamp(h);
  assert.equal(h.bufAlloc, DEFAULT_BUF_ALLOC);
  assert.equal(h.fwdCnt, CREDIT_UPDATE_THRESHOLD);
  assert.equal(c.lastSentFwdCnt, CREDIT_UPDATE_THRESHOLD);
  assert.equal(c.needsCreditUpdate(), false);
  assert.equal(c.peerSeenFree(), CREDIT_UPDATE_THRESHOLD);
});

Deno.test("the threshold is clamped to half of a small buffer", () => {
  const c = new Credit(4096);
  assert.equal(c.effectiveThreshold(), 2048);
  assert.ok(c.onReceived(4096));
  c.onForwarded(2047);
  assert.equal(c.needsCreditUpdate(), false);
  c.onForwarded(1);
  assert.equal(c.needsCreditUpdate(), true);
  assert.equal(new Credit(1).effectiveThreshold(), 1);
  assert.equal(new Credit(0).effectiveThreshold(), 1);
  assert.equal(new Credit(DEFAULT_BUF_ALLOC, 0).effectiveThreshold(), 1);
});

Deno.test("a changed bufAlloc needs an update until sent", () => {
  const c = new Credit(1000);
  c.setBufAlloc(5000);
  assert.equal(c.needsCreditUpdate(), true);
  c.markCreditSent();
  assert.equal(c.needsCreditUpdate(), false);
  assert.equal(c.lastSentBufAlloc, 5000);
});

Deno.test("reset returns to a fresh state", () => {
  const c = new Credit(1000);
  c.updateFromPeer(10, 0);
  c.consumeTx(5);
  assert.ok(c.onReceived(5));
  c.reset(2000);
  assert.deepEqual({ ...c }, { ...new Credit(2000) });
});

/**
 * Unbounded reference model: the same quantities with plain (non-wrapping) integers, counters
 * starting at an arbitrary u32 `base` so that they cross 2^32 during the run.
 */
Deno.test("property: wrapped counters agree with an unbounded model and never exceed buf_alloc", () => {
  type Op =
    | { k: "send"; n: number }
    | { k: "peer"; bufAlloc: number; consumed: number }
    | { k: "recv"; n: number }
    | { k: "fwd"; n: number };
  const op: fc.Arbitrary<Op> = fc.oneof(
    fc.record({ k: fc.constant("send" as const), n: fc.nat({ max: 100_000 }) }),
    fc.record({
      k: fc.constant("peer" as const),
      bufAlloc: fc.nat({ max: 300_000 }),
      consumed: fc.nat({ max: 100_000 }),
    }),
    fc.record({ k: fc.constant("recv" as const), n: fc.nat({ max: 100_000 }) }),
    fc.record({ k: fc.constant("fwd" as const), n: fc.nat({ max: 100_000 }) }),
  );
  fc.assert(
    fc.property(
      fc.nat({ max: U32 - 1 }),
      fc.nat({ max: 300_000 }),
      fc.array(op, { maxLength: 200 }),
      (base, bufAlloc, ops) => {
        const c = new Credit(bufAlloc);
        c.txCnt =
          c.peerFwdCnt =
          c.rxCnt =
          c.fwdCnt =
          c.lastSentFwdCnt =
            base;
        // model
        let sent = 0, peerConsumed = 0, peerBuf = 0, received = 0, forwarded = 0;
        for (const o of ops) {
          switch (o.k) {
            case "send": {
              const free = Math.max(0, peerBuf - (sent - peerConsumed));
              assert.equal(c.peerFree(), free);
              assert.ok(c.peerFree() <= c.peerBufAlloc);
              const n = Math.min(o.n, free);
              c.consumeTx(n);
              sent += n;
              break;
            }
            case "peer": {
              // a well-behaved peer reports at most what it received
              peerConsumed = Math.min(sent, peerConsumed + o.consumed);
              peerBuf = o.bufAlloc;
              c.updateFromPeer(peerBuf, (base + peerConsumed) % U32);
              break;
            }
            case "recv": {
              const ok = received + o.n - forwarded <= bufAlloc;
              assert.equal(c.onReceived(o.n), ok);
              if (ok) received += o.n;
              break;
            }
            case "fwd": {
              const n = Math.min(o.n, received - forwarded);
              c.onForwarded(n);
              forwarded += n;
              break;
            }
          }
          assert.equal(c.txCnt, (base + sent) % U32);
          assert.equal(c.rxCnt, (base + received) % U32);
          assert.equal(c.fwdCnt, (base + forwarded) % U32);
          assert.equal(c.buffered(), received - forwarded);
          assert.ok(c.buffered() <= bufAlloc);
          assert.ok(c.peerFree() <= c.peerBufAlloc);
        }
      },
    ),
    { numRuns: 300 },
  );
});

/**
 * Two ends exchanging data through credit only: the sender never exceeds the receiver's
 * credit, and the receiver's update rule never leaves a sender stalled once the receiver has
 * forwarded everything (no credit deadlock), whatever the buffer size and read pattern.
 */
Deno.test("property: sender and receiver never overrun and never deadlock", () => {
  fc.assert(
    fc.property(
      fc.nat({ max: U32 - 1 }),
      fc.integer({ min: 1, max: 300_000 }),
      fc.array(
        fc.record({
          write: fc.nat({ max: 70_000 }),
          read: fc.nat({ max: 70_000 }),
          drain: fc.boolean(),
        }),
        { maxLength: 150 },
      ),
      (base, bufAlloc, steps) => {
        const tx = new Credit(); // the guest's side of the flow
        const rx = new Credit(bufAlloc); // ours
        rx.rxCnt = rx.fwdCnt = rx.lastSentFwdCnt = base;
        tx.txCnt = base;
        const h = new PacketHeader();
        rx.stamp(h); // the handshake carries our credit
        tx.updateFromPeer(h.bufAlloc, h.fwdCnt);
        let updates = 0;
        for (const s of steps) {
          const n = Math.min(s.write, tx.peerFree(), 65_536);
          tx.consumeTx(n);
          assert.ok(rx.onReceived(n), "the sender overran the receiver's credit");
          const r = s.drain ? rx.buffered() : Math.min(s.read, rx.buffered());
          rx.onForwarded(r);
          if (rx.needsCreditUpdate()) {
            rx.stamp(h);
            tx.updateFromPeer(h.bufAlloc, h.fwdCnt);
            updates++;
          }
          if (rx.buffered() === 0) {
            assert.ok(tx.peerFree() > 0, "sender stalled although the receiver is empty");
          }
        }
        // updates are batched: at most one per half buffer / threshold forwarded
        const forwarded = (rx.fwdCnt - base + U32) % U32;
        assert.ok(updates <= Math.floor(forwarded / rx.effectiveThreshold()) + 1);
      },
    ),
    { numRuns: 300 },
  );
});
