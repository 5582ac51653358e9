/**
 * Dirty-page logging for live migration (LOG_SHMFD + VHOST_F_LOG_ALL): exactly the pages the
 * back end wrote are marked, none without LOG_ALL, and a log fd too small for its announced
 * mmap_size is refused instead of raising SIGBUS in the back end.
 */
import assert from "node:assert/strict";
import { close, memfdCreate } from "../../ffi/mod.ts";
import { pattern, readExactly, startVm, type VmHandle, writeAll } from "../../lib/testing/mod.ts";
import { encodeLog } from "../../lib/vhost_user/messages.ts";
import {
  VhostUserProtocolFeatureMask as PF,
  VhostUserRequest as R,
} from "../../lib/vhost_user/protocol.ts";
import { VRING_DESC_F_WRITE } from "../../lib/virtio/split_layout.ts";
import { withStderr } from "./snapshot_helpers.ts";
import { dirtyLogTraffic, PAGE, pagesOf } from "./vm_helpers.ts";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/** Used elements [from, to) of a split ring: {id, len}. */
function usedElems(vm: VmHandle, usedGpa: number, size: number, from: number, to: number) {
  const out: { id: number; len: number }[] = [];
  for (let i = from; i !== to; i = (i + 1) & 0xffff) {
    const v = new DataView(vm.memory.read(usedGpa + 4 + 8 * (i & (size - 1)), 8).buffer);
    out.push({ id: v.getUint32(0, true), len: v.getUint32(4, true) });
  }
  return out;
}

/** Descriptor `i` of the table at `descGpa`. */
function desc(vm: VmHandle, descGpa: number, i: number) {
  const v = new DataView(vm.memory.read(descGpa + 16 * i, 16).buffer);
  return {
    addr: v.getUint32(0, true) + v.getUint32(4, true) * 2 ** 32,
    len: v.getUint32(8, true),
    flags: v.getUint16(12, true),
  };
}

// ---------------------------------------------------------------------------------------
// Dirty-page logging
// ---------------------------------------------------------------------------------------

Deno.test("dirty log with LOG_ALL: exactly the pages the back end wrote are marked", async () => {
  const vm = await startVm({ profile: "qemu", cid: 3 });
  try {
    await withStderr(() => [vm.backend], async () => {
      const fe = vm.frontEnd;
      assert.ok(fe.ackedProtocolFeatures & PF.LOG_SHMFD, "LOG_SHMFD negotiated");
      const listener = vm.guest.listen(5000);
      const [host, conn] = await Promise.all([vm.hostConnect(5000), listener.accept()]);
      const log = fe.startDirtyLog();
      await vm.guest.idle(200);
      vm.faults.starveRx(); // rx descriptors keep pointing at the buffers the device filled
      const setups = vm.guest.queueSetups;
      for (const s of setups) {
        const end = s.usedGpa + 6 + 8 * s.size;
        assert.equal(Math.floor(s.descGpa / PAGE), Math.floor((end - 1) / PAGE), "1-page ring");
      }
      const rx = setups[0];
      const tx = setups[1];
      const rxFrom = vm.guest.queue(0).readUsedIdx();
      const txFrom = vm.guest.queue(1).readUsedIdx();
      log.clear();

      const { payloadGpa, payloadLen, headerGpa } = await dirtyLogTraffic(vm, conn, host.conn);

      const rxTo = vm.guest.queue(0).readUsedIdx();
      const txTo = vm.guest.queue(1).readUsedIdx();
      assert.ok(rxTo !== rxFrom && txTo !== txFrom, "both rings were used");
      const expected = new Set<number>([...pagesOf(rx.descGpa, 1), ...pagesOf(tx.descGpa, 1)]);
      for (const u of usedElems(vm, rx.usedGpa, rx.size, rxFrom, rxTo)) {
        const d = desc(vm, rx.descGpa, u.id);
        assert.equal(d.flags, VRING_DESC_F_WRITE, "one writable descriptor per rx buffer");
        assert.ok(u.len <= d.len);
        for (const p of pagesOf(d.addr, u.len)) expected.add(p);
      }
      const dirty = new Set(log.dirtyPages().map((g) => g / PAGE));
      const missing = [...expected].filter((p) => !dirty.has(p));
      const extra = [...dirty].filter((p) => !expected.has(p));
      assert.deepEqual(missing, [], "pages written by the back end but not marked");
      assert.deepEqual(extra, [], "pages marked that the back end did not write");
      // The checks above are not vacuous: the read-only payload and unused RAM are clear.
      for (const p of pagesOf(payloadGpa, payloadLen)) assert.ok(!dirty.has(p));
      assert.ok(!log.isDirty(setups[2].descGpa), "event ring (VMM's) is clear");
      assert.ok(!log.isDirty(vm.memory.topGpa - 1), "the last page of RAM is clear");
      assert.ok(!log.isDirty(headerGpa) || expected.has(Math.floor(headerGpa / PAGE)));

      vm.faults.refillRx();
      fe.stopDirtyLog();
      host.conn.close();
      await conn.close();
      assert.deepEqual(vm.guest.anomalies, []);
    });
  } finally {
    await vm.stop();
  }
});

Deno.test("dirty log without LOG_ALL: SET_LOG_BASE alone marks nothing; LOG_ALL then does", async () => {
  const vm = await startVm({ profile: "qemu", cid: 3 });
  try {
    await withStderr(() => [vm.backend], async () => {
      const fe = vm.frontEnd;
      const listener = vm.guest.listen(5000);
      const [host, conn] = await Promise.all([vm.hostConnect(5000), listener.accept()]);
      const log = fe.setLogBase();
      assert.equal(fe.ackedFeatures! & (1n << 26n), 0n, "VHOST_F_LOG_ALL not acked");
      const a = pattern(30_000, 121);
      await writeAll(host.conn, a);
      assert.deepEqual(await conn.readExactly(a.length), a);
      await conn.write(a);
      assert.deepEqual(await readExactly(host.conn, a.length), a);
      await vm.guest.idle(100);
      assert.deepEqual(log.dirtyPages(), [], "no bits without LOG_ALL");

      // Same log, logging switched on: now bits appear (the log is live, the check above
      // was not vacuous).
      const on = fe.startDirtyLog();
      on.clear();
      await writeAll(host.conn, a);
      assert.deepEqual(await conn.readExactly(a.length), a);
      assert.ok(on.isDirty(vm.guest.queueSetups[0].usedGpa), "rx used ring marked");
      fe.stopDirtyLog();
      host.conn.close();
      await conn.close();
      assert.deepEqual(vm.guest.anomalies, []);
    });
  } finally {
    await vm.stop();
  }
});

Deno.test("dirty log: a log fd smaller than mmap_size is refused, not a SIGBUS", async () => {
  const vm = await startVm({ profile: "qemu", cid: 3 });
  try {
    await withStderr(() => [vm.backend], async () => {
      const fe = vm.frontEnd;
      const listener = vm.guest.listen(5000);
      const [host, conn] = await Promise.all([vm.hostConnect(5000), listener.accept()]);
      // The front end claims a 4 KiB log but its memfd is empty: touching the mapping would
      // raise SIGBUS and kill every VM of the daemon.
      const fd = memfdCreate("short-dirty-log", 0);
      let ack: bigint;
      try {
        const reply = fe.request(R.SET_LOG_BASE, encodeLog({ mmapSize: PAGE, mmapOffset: 0 }), [
          fd,
        ]);
        assert.ok(reply !== null, "SET_LOG_BASE is answered (LOG_SHMFD)");
        ack = new DataView(reply.payload.buffer, reply.payload.byteOffset).getBigUint64(0, true);
      } finally {
        close(fd);
      }
      fe.setFeatures(fe.ackedFeatures! | (1n << 26n), { needReply: true }); // LOG_ALL
      const a = pattern(20_000, 131);
      await writeAll(host.conn, a);
      try {
        assert.deepEqual(await conn.readExactly(a.length), a);
      } catch (e) {
        const status = await Promise.race([
          vm.backend.exited,
          new Promise((r) => setTimeout(() => r("still running"), 2000)),
        ]);
        throw new Error(`traffic with the short log failed; back end: ${JSON.stringify(status)}`, {
          cause: e,
        });
      }
      assert.ok(vm.backend.running, "the back end survived");
      assert.notEqual(ack, 0n, "SET_LOG_BASE with a log the fd cannot back is refused");
      host.conn.close();
      await conn.close();
    });
  } finally {
    await vm.stop();
  }
});
