/**
 * Suspend (GET_VRING_BASE on every ring) and resume of a whole VM (the back end as a child
 * process, `lib/testing`): no guest memory write and no interrupt while suspended, host traffic
 * and connections kept, the right ring bases, everything flows after the restart. Over split and
 * packed virtqueues (a packed ring's vring base carries both positions, compared with
 * `baseAvailIdx` / `baseUsedIdx`).
 */
import assert from "node:assert/strict";
import { pollFds, POLLIN } from "../../ffi/mod.ts";
import {
  baseAvailIdx,
  baseUsedIdx,
  type GuestRam,
  pattern,
  readExactly,
  type VsockGuest,
  writeAll,
} from "../../lib/testing/mod.ts";
import { usedRingSize } from "../../lib/virtio/split_layout.ts";
import { PACKED_EVENT_SIZE } from "../../lib/virtio/packed_layout.ts";
import { clearKicks, sleep, withVm } from "./vm_helpers.ts";
import { waitUntil } from "./raw_guest.ts";
import { countOf, guestToHost, hostToGuest, later, rings } from "./lifecycle_helpers.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();

/** Whether an eventfd's counter is non-zero (poll without consuming it). */
function eventPending(fd: number): boolean {
  return (pollFds([fd], [POLLIN], 0)[0] & POLLIN) !== 0;
}

// ---------------------------------------------------------------------------------------
// Suspend / resume
// ---------------------------------------------------------------------------------------

/** A copy of every byte of guest RAM. */
function snapshotRam(mem: GuestRam): Uint8Array[] {
  return mem.regions.map((r) => r.bytes.slice());
}

/** The guest-physical address of the first byte that differs from `snap`, or null. */
function firstDifference(mem: GuestRam, snap: Uint8Array[]): number | null {
  for (let i = 0; i < snap.length; i++) {
    const r = mem.regions[i];
    const now = r.bytes;
    const was = snap[i];
    const a = new Float64Array(now.buffer, now.byteOffset, now.length >>> 3);
    const b = new Float64Array(was.buffer, was.byteOffset, was.length >>> 3);
    for (let k = 0; k < a.length; k++) {
      if (!Object.is(a[k], b[k])) {
        for (let j = k * 8; j < k * 8 + 8; j++) if (now[j] !== was[j]) return r.gpa + j;
      }
    }
  }
  return null;
}

/** Names the ring structure holding `gpa`, or "a buffer". */
function whereIs(g: VsockGuest, gpa: number): string {
  const names = ["rx", "tx", "event"];
  for (const s of g.queueSetups) {
    // split: descriptor table, avail ring, used ring; packed: the descriptor ring and the
    // driver and device event suppression areas
    const [desc, avail, used] = s.packed
      ? ["descriptor ring", "driver event suppression", "device event suppression"]
      : ["descriptor table", "avail ring", "used ring"];
    const usedEnd = s.usedGpa + (s.packed ? PACKED_EVENT_SIZE : usedRingSize(s.size, true));
    if (gpa >= s.descGpa && gpa < s.availGpa) return `${names[s.index]} ${desc}`;
    if (gpa >= s.availGpa && gpa < s.usedGpa) return `${names[s.index]} ${avail}`;
    if (gpa >= s.usedGpa && gpa < usedEnd) return `${names[s.index]} ${used}`;
  }
  return "a buffer";
}

for (
  const v of [
    { profile: "qemu", how: "GET_VRING_BASE only" },
    { profile: "crosvm", how: "SET_VRING_ENABLE 0 + GET_VRING_BASE, restart with the bases" },
    { profile: "qemu", how: "GET_VRING_BASE only", packed: true },
    {
      profile: "crosvm",
      how: "SET_VRING_ENABLE 0 + GET_VRING_BASE, restart with the bases",
      packed: true,
    },
  ] as const
) {
  const packed = "packed" in v;
  Deno.test(`suspend/resume: no guest memory write or interrupt while suspended, right bases, traffic kept [${v.profile}: ${v.how}${rings(packed)}]`, async () => {
    await withVm({ profile: v.profile, frontEnd: { packed } }, async (vm) => {
      const g = vm.guest;
      assert.equal(g.packed, packed);
      const fe = vm.frontEnd;
      const rx = g.queue(0);
      const tx = g.queue(1);
      const suspend = () => v.profile === "qemu" ? vm.faults.stopRings() : g.suspend();
      const resume = (bases: number[]) =>
        v.profile === "qemu" ? fe.restartRings(bases) : g.resume(bases);
      const a = await hostToGuest(vm, 5000);
      const b = await guestToHost(vm, 6000);
      const exchange = async (n: number, seed: number) => {
        const d = pattern(n, seed);
        await Promise.all([writeAll(a.host.conn, d), b.conn.write(d)]);
        assert.deepEqual(await a.conn.readExactly(n), d);
        assert.deepEqual(await readExactly(b.host, n), d);
      };
      await exchange(50_000, 1);
      // A base's avail position (a packed base's low half) is where the device goes on
      // taking buffers; a packed base's used half must match the used descriptors too.
      const checkBases = (bases: number[], label: string) => {
        const txAt = baseAvailIdx(tx, bases[1]);
        assert.equal(txAt, tx.availIdx, `${label}: GET_VRING_BASE(tx) = chains posted`);
        assert.equal(txAt, tx.readUsedIdx(), `${label}: = chains the device consumed`);
        const rxAt = baseAvailIdx(rx, bases[0]);
        assert.equal(rxAt, rx.readUsedIdx(), `${label}: GET_VRING_BASE(rx) = buffers used`);
        if (packed) {
          assert.equal(baseUsedIdx(tx, bases[1]), txAt, `${label}: tx used half`);
          assert.equal(baseUsedIdx(rx, bases[0]), rxAt, `${label}: rx used half`);
        } else {
          assert.ok(bases[0] <= rx.availIdx);
        }
        if (fe.ownsQueue(2)) {
          assert.equal(bases[2], g.queueSetups[2].base, `${label}: no event buffer consumed`);
        }
      };
      await g.waitFor(() => tx.readUsedIdx() === tx.availIdx, 5000, "tx ring drained");
      const bases = suspend();
      checkBases(bases, "first suspend");
      const fresh = g.queueSetups.map((q) => q.base);
      assert.ok(bases[0] !== fresh[0] && bases[1] !== fresh[1], `non-trivial bases ${bases}`);

      const owned = [0, 1, 2].filter((i) => fe.ownsQueue(i));
      for (const i of owned) fe.takeCall(i);
      const snap = snapshotRam(vm.memory);
      // Host traffic while suspended: data on both connections and a new connect.
      const dataA = pattern(40_000, 11);
      const dataB = pattern(20_000, 12);
      await writeAll(a.host.conn, dataA);
      await writeAll(b.host, dataB);
      const connecting = later(vm.hostConnect(5000));
      await waitUntil(
        () => countOf(vm.backend.stderr(), "host app connecting to guest port 5000") === 2,
        5000,
        "the CONNECT to be parsed",
      );
      await sleep(300);
      const diff = firstDifference(vm.memory, snap);
      assert.equal(
        diff,
        null,
        diff === null
          ? ""
          : `guest memory written while suspended at 0x${diff.toString(16)} (${whereIs(g, diff)})`,
      );
      for (const i of owned) {
        assert.equal(eventPending(fe.callFds[i]), false, `no interrupt on queue ${i}`);
      }
      assert.equal(a.conn.state, "established");
      assert.equal(b.conn.state, "established");
      assert.ok(vm.backend.running);

      clearKicks(fe); // the guest did not kick while suspended
      resume(bases);
      assert.deepEqual(await a.conn.readExactly(dataA.length), dataA);
      assert.deepEqual(await b.conn.readExactly(dataB.length), dataB);
      const [h3, c3] = await Promise.all([connecting, a.listener.accept()]);
      await exchange(30_000, 2);
      await writeAll(h3.conn, enc.encode("third"));
      assert.equal(dec.decode(await c3.readExactly(5)), "third");

      // Suspend again: the bases moved on with the traffic.
      await g.waitFor(() => tx.readUsedIdx() === tx.availIdx, 5000, "tx ring drained");
      const bases2 = suspend();
      checkBases(bases2, "second suspend");
      assert.ok(bases2[0] !== bases[0] && bases2[1] !== bases[1]);
      resume(bases2);
      await exchange(10_000, 3);
      for (const h of [a.host.conn, b.host, h3.conn]) h.close();
      b.hl.close();
      await Promise.all([a.conn.close(), c3.close()]);
    });
  });
}
