/** Unit tests for ffi/: each wrapper against the real kernel. */
import assert from "node:assert/strict";
import * as ffi from "../../ffi/mod.ts";

function tmpSockPath(tag: string): string {
  return `${Deno.makeTempDirSync({ prefix: "vuv-ffi-" })}/${tag}.sock`;
}

Deno.test("socketpair + read/write + EAGAIN as -errno", () => {
  const [a, b] = ffi.unixSocketPair();
  try {
    assert.equal(ffi.writeRaw(a, new Uint8Array([1, 2, 3])), 3);
    const buf = new Uint8Array(8);
    assert.equal(ffi.readRaw(b, buf), 3);
    assert.deepEqual([...buf.subarray(0, 3)], [1, 2, 3]);
    assert.equal(ffi.readRaw(b, buf), -ffi.EAGAIN);
  } finally {
    ffi.close(a);
    ffi.close(b);
  }
});

Deno.test("write to a closed peer gives EPIPE, not a signal", () => {
  const [a, b] = ffi.unixSocketPair();
  ffi.close(b);
  assert.equal(ffi.writeRaw(a, new Uint8Array(4)), -ffi.EPIPE);
  ffi.close(a);
});

Deno.test("readv/writev scatter-gather through memfd mappings", () => {
  const fd = ffi.memfdCreate("t", 8192);
  const m = ffi.mapShared(fd, 8192);
  const [a, b] = ffi.unixSocketPair();
  try {
    m.bytes.set([10, 11, 12, 13], 100);
    m.bytes.set([20, 21], 5000);
    const iov = new BigUint64Array([
      BigInt(m.addr + 100),
      4n,
      BigInt(m.addr + 5000),
      2n,
    ]);
    assert.equal(ffi.writevRaw(a, iov, 2), 6);
    const out = new BigUint64Array([BigInt(m.addr + 7000), 3n, BigInt(m.addr + 7100), 3n]);
    assert.equal(ffi.readvRaw(b, out, 2), 6);
    assert.deepEqual([...m.bytes.subarray(7000, 7003)], [10, 11, 12]);
    assert.deepEqual([...m.bytes.subarray(7100, 7103)], [13, 20, 21]);
    // a second mapping of the same memfd sees the same bytes (MAP_SHARED)
    const m2 = ffi.mapShared(fd, 4096, 4096);
    assert.equal(m2.bytes[5000 - 4096], 20);
    ffi.unmap(m2);
  } finally {
    ffi.unmap(m);
    ffi.close(fd);
    ffi.close(a);
    ffi.close(b);
  }
});

Deno.test("listen/connect/accept by path; ENOENT and ECONNREFUSED", () => {
  const path = tmpSockPath("l");
  const l = ffi.listenUnix(path);
  try {
    assert.equal(ffi.acceptRaw(l), -ffi.EAGAIN);
    const c = ffi.connectUnix(path);
    const s = ffi.acceptRaw(l);
    assert.ok(s >= 0);
    assert.equal(ffi.writeRaw(c, new TextEncoder().encode("hi")), 2);
    const buf = new Uint8Array(4);
    assert.equal(ffi.readRaw(s, buf), 2);
    assert.equal(ffi.shutdownRaw(c, ffi.SHUT_WR), 0);
    assert.equal(ffi.readRaw(s, buf), 0, "EOF after shutdown(SHUT_WR)");
    assert.equal(ffi.getSockOptInt(s, ffi.SO_ERROR), 0);
    ffi.close(c);
    ffi.close(s);
  } finally {
    ffi.close(l);
  }
  assert.throws(() => ffi.connectUnix(path + ".none"), (e: unknown) => {
    return e instanceof ffi.SysError && e.code === "ENOENT";
  });
  // a socket file with nobody listening
  const dead = tmpSockPath("dead");
  ffi.close(ffi.listenUnix(dead));
  assert.throws(() => ffi.connectUnix(dead), (e: unknown) => {
    return e instanceof ffi.SysError && e.code === "ECONNREFUSED";
  });
  assert.throws(() => ffi.sockaddrUn("x".repeat(200)), /too long/);
});

Deno.test("sendmsg/recvmsg pass fds with SCM_RIGHTS", () => {
  const [a, b] = ffi.unixSocketPair();
  const efd = ffi.eventFd();
  const mfd = ffi.memfdCreate("passed", 4096);
  try {
    assert.equal(ffi.sendWithFds(a, new Uint8Array([7, 8, 9]), [efd, mfd]), 3);
    const buf = new Uint8Array(16);
    const r = ffi.recvWithFds(b, buf);
    assert.ok(typeof r !== "number");
    assert.equal(r.n, 3);
    assert.equal(r.fds.length, 2);
    assert.equal(r.truncated, false);
    // the received eventfd is the same object
    ffi.eventFdWrite(r.fds[0], 5n);
    assert.equal(ffi.eventFdRead(efd), 5n);
    // the received memfd maps the same memory
    const m1 = ffi.mapShared(mfd, 4096);
    const m2 = ffi.mapShared(r.fds[1], 4096);
    m1.bytes[10] = 42;
    assert.equal(m2.bytes[10], 42);
    ffi.unmap(m1);
    ffi.unmap(m2);
    r.fds.forEach(ffi.close);
    assert.equal(ffi.recvWithFds(b, buf), -ffi.EAGAIN);
    ffi.close(a);
    const eof = ffi.recvWithFds(b, buf);
    assert.ok(typeof eof !== "number" && eof.n === 0);
  } finally {
    ffi.close(b);
    ffi.close(efd);
    ffi.close(mfd);
  }
});

Deno.test("epoll + eventfd + timerfd", () => {
  const ep = new ffi.Epoll(8);
  const efd = ffi.eventFd();
  const tfd = ffi.timerFd();
  try {
    ep.add(efd, ffi.EPOLLIN);
    ep.add(tfd, ffi.EPOLLIN);
    assert.equal(ep.wait(0), 0);
    ffi.eventFdWrite(efd);
    assert.equal(ep.wait(0), 1);
    assert.equal(ep.events[1], efd);
    assert.ok(ep.events[0] & ffi.EPOLLIN);
    assert.equal(ffi.eventFdRead(efd), 1n);
    assert.equal(ffi.eventFdRead(efd), 0n);
    const t0 = performance.now();
    ffi.timerFdArm(tfd, 20);
    assert.equal(ep.wait(1000), 1);
    assert.equal(ep.events[1], tfd);
    assert.ok(performance.now() - t0 >= 15);
    ep.delete(tfd);
    ep.delete(tfd); // deleting twice is harmless
  } finally {
    ep.close();
    ffi.close(efd);
    ffi.close(tfd);
  }
});

Deno.test("poll, pipes, non-blocking toggles, fd counting, errors carry errno names", () => {
  const [r, w] = ffi.pipe(true);
  try {
    assert.deepEqual(ffi.pollFds([r], [ffi.POLLIN], 0), [0]);
    ffi.writeAll(w, new Uint8Array([1]));
    assert.deepEqual(ffi.pollFds([r], [ffi.POLLIN], 0), [ffi.POLLIN]);
    ffi.setNonBlocking(r, false);
    ffi.setNonBlocking(r, true);
    assert.ok(ffi.isOpen(r));
    assert.ok(ffi.openFdCount() > 2);
  } finally {
    ffi.close(r);
    ffi.close(w);
  }
  // (not asserting isOpen(r) === false: under `deno test --parallel` another test in this
  // process may already own the recycled fd number)
  const err = new ffi.SysError("read", ffi.EBADF, "fd 999");
  assert.equal(err.code, "EBADF");
  assert.match(err.message, /read fd 999: EBADF/);
  assert.ok(ffi.cpuSeconds() >= 0);
  assert.ok(ffi.rssBytes() > 1 << 20);
});

Deno.test("pollFdsAsync waits on a helper thread while the event loop runs", async () => {
  const efd = ffi.eventFd();
  try {
    let timerRan = false;
    setTimeout(() => {
      timerRan = true;
      ffi.eventFdWrite(efd);
    }, 10);
    const rev = await ffi.pollFdsAsync([efd], [ffi.POLLIN], 2000);
    assert.ok(timerRan, "the JS timer ran while poll was pending");
    assert.equal(rev[0] & ffi.POLLIN, ffi.POLLIN);
    assert.deepEqual(await ffi.pollFdsAsync([efd], [ffi.POLLOUT], 0), [ffi.POLLOUT]);
  } finally {
    ffi.close(efd);
  }
});

Deno.test("MessageIo keeps the buffers its iovecs point at alive (no use after free)", async () => {
  const probe = new URL("./fixtures/message_io_gc_probe.ts", import.meta.url).pathname;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--v8-flags=--expose-gc", probe],
    stdout: "piped",
    stderr: "inherit",
  }).output();
  assert.ok(out.success, "the probe ran");
  const r = JSON.parse(new TextDecoder().decode(out.stdout));
  assert.deepEqual(r, { n: 4096, firstBad: -1 }, "the message carried the buffer's bytes");
});
