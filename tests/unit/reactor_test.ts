/** The reactor: fd handlers, timers (order, cancel), wakeups, again(), batch-end hooks, errors. */
import assert from "node:assert/strict";
import { close, EPOLLIN, eventFd, eventFdRead, eventFdWrite } from "../../ffi/mod.ts";
import { Reactor } from "../../lib/reactor.ts";

Deno.test("reactor: fd handler runs on readiness, batch-end hooks after the batch", () => {
  const r = new Reactor();
  const efd = eventFd();
  const order: string[] = [];
  try {
    r.addFd(efd, EPOLLIN, (ev) => {
      assert.ok(ev & EPOLLIN);
      eventFdRead(efd);
      order.push("fd");
    });
    const hook = () => order.push("batch-end");
    r.onBatchEnd(hook);
    assert.equal(r.runOnce(0), 0);
    eventFdWrite(efd);
    assert.equal(r.runOnce(100), 1);
    assert.deepEqual(order.slice(-2), ["fd", "batch-end"]);
    r.offBatchEnd(hook);
    r.removeFd(efd);
    r.removeFd(efd); // twice is harmless
    assert.equal(r.has(efd), false);
    eventFdWrite(efd);
    assert.equal(r.runOnce(0), 0, "a removed fd is not watched");
  } finally {
    close(efd);
    r.close();
  }
});

Deno.test("reactor: timers fire in deadline order, cancelled ones never", () => {
  const r = new Reactor();
  const fired: number[] = [];
  try {
    r.setTimer(30, () => fired.push(30));
    r.setTimer(10, () => fired.push(10));
    const t = r.setTimer(20, () => fired.push(20));
    r.setTimer(10, () => fired.push(11)); // same deadline: insertion order
    t.cancel();
    const start = performance.now();
    while (fired.length < 3 && performance.now() - start < 2000) r.runOnce(100);
    assert.deepEqual(fired, [10, 11, 30]);
    assert.ok(performance.now() - start >= 25, "the last timer waited for its deadline");
  } finally {
    r.close();
  }
});

Deno.test("reactor: a throwing handler is logged and the loop goes on; wake() stops run()", () => {
  const r = new Reactor();
  const efd = eventFd();
  try {
    r.addFd(efd, EPOLLIN, () => {
      eventFdRead(efd);
      throw new Error("boom");
    });
    eventFdWrite(efd);
    assert.equal(r.runOnce(100), 1); // no throw escapes
    let woke = 0;
    r.onWake(() => {
      woke++;
      r.stop();
    });
    r.setTimer(5, () => r.wake()); // as another thread would, through wakeFd
    r.run(); // returns once the wake handler stops it
    assert.equal(woke, 1);
    assert.equal(r.stopped, true);
  } finally {
    close(efd);
    r.close();
  }
});

Deno.test("reactor: with pollUs it keeps polling after activity instead of sleeping", () => {
  const spins = (pollUs: number): number => {
    const r = new Reactor();
    try {
      r.pollUs = pollUs;
      let batches = 0;
      r.onBatchEnd(() => batches++);
      r.setTimer(5, () => {}); // activity at 5 ms
      r.setTimer(40, () => r.stop());
      r.run();
      return batches;
    } finally {
      r.close();
    }
  };
  const sleeping = spins(0);
  const polling = spins(20_000);
  assert.ok(sleeping <= 4, `without polling the loop slept: ${sleeping} batches`);
  assert.ok(polling > 100, `with polling the loop kept asking epoll: ${polling} batches`);
});

Deno.test("reactor: again() makes the next batch not sleep, once, and its hooks run", () => {
  const r = new Reactor();
  let hooks = 0;
  const hook = () => {
    // A hook that stopped with work left asks for one more batch, the first time only.
    if (hooks++ === 0) r.again();
  };
  try {
    r.onBatchEnd(hook);
    r.runOnce(0);
    const t0 = performance.now();
    assert.equal(r.runOnce(2000), 0, "no fd was ready");
    assert.ok(performance.now() - t0 < 500, "the batch after again() did not sleep");
    assert.equal(hooks, 2);
    const t1 = performance.now();
    r.runOnce(60);
    assert.ok(performance.now() - t1 >= 50, "without again() the next batch sleeps again");
  } finally {
    r.offBatchEnd(hook);
    r.close();
  }
});
