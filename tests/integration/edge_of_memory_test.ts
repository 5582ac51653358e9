/**
 * Descriptors at the very edges of guest RAM, through the real back end (main.ts as a child
 * process) and the testing library's front end and guest driver.
 *
 * Guest RAM is four regions: two adjacent ones (16 MiB + 1 MiB), then two more each after a
 * gap. For tx buffers, rx buffers and indirect tables:
 * - one ending exactly at a region's end is used (a tx packet is acted on: the back end answers
 *   a packet for no connection with RST; an rx buffer receives a packet);
 * - one ending one byte past a region followed by a gap is returned unused (used len 0) and
 *   logged, and the device keeps working; followed by the adjacent region, a buffer continues
 *   there (an indirect table never may: it must lie inside one region).
 * A back end whose bounds check is off by one reads or writes the byte after a mapping here.
 * Split and packed rings alike.
 */

import assert from "node:assert/strict";
import {
  type CapturedPacket,
  PacketHeader,
  startVm,
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_OP_RST,
  type VmHandle,
  VSOCK_VQ_RX,
  withTimeout,
} from "../../lib/testing/mod.ts";
import type { RawDescriptor } from "../../lib/testing/guest_types.ts";
import {
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_DESC_SIZE,
  writeDescriptor,
} from "../../lib/virtio/split_layout.ts";
import { writePackedDescriptor } from "../../lib/virtio/packed_layout.ts";

const MiB = 1024 * 1024;
const REGIONS = [
  { gpa: 0, size: 16 * MiB },
  { gpa: 16 * MiB, size: MiB }, // adjacent to the first
  { gpa: 32 * MiB, size: MiB },
  { gpa: 64 * MiB, size: 2 * MiB },
];
/** A host port nobody listens on: packets to it get RST. */
const NOBODY = 7777;

async function withEdgeVm(packed: boolean, fn: (vm: VmHandle) => Promise<void>): Promise<void> {
  const vm = await startVm({
    profile: "qemu", // INDIRECT_DESC negotiated
    frontEnd: { regions: REGIONS, packed },
    guest: { rxBuffers: 4, timeoutMs: 5000 },
  });
  try {
    assert.equal(vm.guest.packed, packed);
    await fn(vm);
    assert.deepEqual(vm.guest.anomalies, []);
  } catch (e) {
    const exit = await vm.stop();
    throw new Error(`${e instanceof Error ? e.stack : e}\n--- back end stderr ---\n${exit.stderr}`);
  }
  const exit = await vm.stop();
  assert.equal(exit.code, 0, exit.stderr);
}

/** End of region `i`, and whether the next byte is RAM (the adjacent region). */
function edge(vm: VmHandle, i: number): { end: number; adjacent: boolean } {
  const r = vm.memory.regions[i];
  const end = r.gpa + r.size;
  return { end, adjacent: vm.memory.regions.some((o) => o.gpa === end) };
}

/**
 * Writes `bytes` at `gpa` byte by byte, skipping bytes outside RAM (the device must never read
 * them); independent of `regionOf`, the code under test.
 */
function writeWherever(vm: VmHandle, gpa: number, bytes: Uint8Array): void {
  for (let k = 0; k < bytes.length; k++) {
    const g = gpa + k;
    const r = vm.memory.regions.find((r) => g >= r.gpa && g < r.gpa + r.size);
    if (r !== undefined) r.bytes[g - r.gpa] = bytes[k];
  }
}

/** Reads [gpa, gpa+len) byte by byte (0 outside RAM), independently of `regionOf`. */
function readWherever(vm: VmHandle, gpa: number, len: number): Uint8Array {
  const out = new Uint8Array(len);
  for (let k = 0; k < len; k++) {
    const g = gpa + k;
    const r = vm.memory.regions.find((r) => g >= r.gpa && g < r.gpa + r.size);
    if (r !== undefined) out[k] = r.bytes[g - r.gpa];
  }
  return out;
}

/**
 * Encodes `descs` as an indirect descriptor table in the layout of the VM's rings (split: next =
 * the following entry; packed: consecutive entries, id 0).
 */
function table(
  vm: VmHandle,
  descs: readonly { addr: number; len: number; flags: number }[],
): Uint8Array {
  const b = new Uint8Array(VRING_DESC_SIZE * descs.length);
  const v = new DataView(b.buffer);
  descs.forEach((d, k) => {
    const last = k === descs.length - 1;
    const flags = d.flags | (last ? 0 : VRING_DESC_F_NEXT);
    if (vm.guest.packed) writePackedDescriptor(v, VRING_DESC_SIZE * k, d.addr, d.len, 0, flags);
    else writeDescriptor(v, VRING_DESC_SIZE * k, d.addr, d.len, flags, k + 1);
  });
  return b;
}

/** An RW header from the guest to port NOBODY (no connection: the back end answers RST). */
function probeHeader(vm: VmHandle, srcPort: number, payloadLen: number): Uint8Array {
  const h = new PacketHeader();
  h.srcCid = vm.guest.guestCid;
  h.dstCid = 2;
  h.srcPort = srcPort;
  h.dstPort = NOBODY;
  h.len = payloadLen;
  h.type = 1;
  h.op = 5; // RW
  h.bufAlloc = 65536;
  const b = new Uint8Array(VIRTIO_VSOCK_HDR_SIZE);
  h.encodeTo(new DataView(b.buffer), 0);
  return b;
}

/** Puts a raw chain on `queue`, waits until the device returns it; returns its used len. */
async function submit(vm: VmHandle, queue: number, descs: RawDescriptor[]): Promise<number> {
  const before = vm.guest.rawUsed.length;
  const head = vm.faults.writeRawChain(queue, descs);
  await vm.guest.waitFor(() => vm.guest.rawUsed.length > before, 5000, "the raw chain back");
  const u = vm.guest.rawUsed[before];
  assert.equal(u.head, head);
  assert.equal(u.queue, queue);
  return u.len;
}

function rstFor(packets: readonly CapturedPacket[], port: number): boolean {
  return packets.some((p) =>
    p.direction === "rx" && p.header.op === VIRTIO_VSOCK_OP_RST && p.header.dstPort === port
  );
}

function invalidLines(vm: VmHandle, which: "tx" | "rx"): number {
  const re = new RegExp(`invalid ${which} descriptor chain`);
  return vm.backend.stderr().split("\n").filter((l) => re.test(l)).length;
}

/** Waits for `n` "invalid ... descriptor chain" lines (the log trails the used ring), then 100 ms more. */
async function expectInvalidLines(vm: VmHandle, which: "tx" | "rx", n: number): Promise<void> {
  await vm.guest.waitFor(() => invalidLines(vm, which) >= n, 5000, `${n} ${which} log lines`);
  await vm.guest.idle(100);
  assert.equal(invalidLines(vm, which), n, `one log line per rejected ${which} chain`);
}

for (const packed of [false, true]) {
  const rings = packed ? "packed" : "split";
  Deno.test(
    `tx buffers and indirect tables ending exactly at each region's end are used; one byte past is rejected and logged [${rings} rings]`,
    withTimeout(60_000, async () => {
      await withEdgeVm(packed, async (vm) => {
        const cap = vm.guest.capture();
        const accepted: [string, number][] = [];
        const rejected: [string, number][] = [];
        let port = 40000;
        const elsewhere = vm.faults.allocGuest(256);
        for (let i = 0; i < REGIONS.length; i++) {
          const { end, adjacent } = edge(vm, i);
          const cases: [string, (p: number) => RawDescriptor[], boolean][] = [
            ["header ending at the end", (p) => {
              vm.memory.write(end - 44, probeHeader(vm, p, 0));
              return [{ addr: end - 44, len: 44, flags: 0 }];
            }, true],
            ["payload ending at the end", (p) => {
              vm.memory.write(elsewhere, probeHeader(vm, p, 100));
              return [{ addr: elsewhere, len: 44, flags: VRING_DESC_F_NEXT }, {
                addr: end - 100,
                len: 100,
                flags: 0,
              }];
            }, true],
            ["header one byte past the end", (p) => {
              writeWherever(vm, end - 43, probeHeader(vm, p, 0));
              return [{ addr: end - 43, len: 44, flags: 0 }];
            }, adjacent],
            ["indirect table ending at the end", (p) => {
              vm.memory.write(elsewhere, probeHeader(vm, p, 0));
              vm.memory.write(end - 16, table(vm, [{ addr: elsewhere, len: 44, flags: 0 }]));
              return [{ addr: end - 16, len: 16, flags: VRING_DESC_F_INDIRECT }];
            }, true],
            ["indirect table one byte past the end", (p) => {
              vm.memory.write(elsewhere, probeHeader(vm, p, 0));
              writeWherever(vm, end - 15, table(vm, [{ addr: elsewhere, len: 44, flags: 0 }]));
              return [{ addr: end - 15, len: 16, flags: VRING_DESC_F_INDIRECT }];
            }, false],
          ];
          if (i === REGIONS.length - 1) {
            cases.push(["payload one byte past the end", (p) => {
              vm.memory.write(elsewhere, probeHeader(vm, p, 100));
              return [{ addr: elsewhere, len: 44, flags: VRING_DESC_F_NEXT }, {
                addr: end - 99,
                len: 100,
                flags: 0,
              }];
            }, false]);
          }
          for (const [what, build, ok] of cases) {
            const p = port++;
            assert.equal(await submit(vm, 1, build(p)), 0, `${what} of region ${i}: used len`);
            (ok ? accepted : rejected).push([`${what} of region ${i}`, p]);
          }
        }
        // A last good probe: RSTs come in order, so once it is answered every earlier one is.
        const last = port++;
        vm.faults.sendRawPacket({ srcPort: last, dstPort: NOBODY });
        await vm.guest.waitFor(() => rstFor(cap.packets, last), 5000, "the last probe's RST");
        for (const [what, p] of accepted) assert.ok(rstFor(cap.packets, p), `${what}: no RST`);
        for (const [what, p] of rejected) assert.ok(!rstFor(cap.packets, p), `${what}: acted on`);
        await expectInvalidLines(vm, "tx", rejected.length);
        assert.ok(vm.backend.running);
      });
    }),
  );

  Deno.test(
    `rx buffers and indirect tables ending exactly at each region's end receive packets; one byte past is rejected and logged [${rings} rings]`,
    withTimeout(60_000, async () => {
      await withEdgeVm(packed, async (vm) => {
        const cap = vm.guest.capture();
        vm.faults.starveRx();
        // Use up the driver's own rx buffers: from now on only raw ones are posted.
        let port = 50000;
        const first = port;
        while (vm.guest.rxPosted > 0) {
          const p = port++;
          vm.faults.sendRawPacket({ srcPort: p, dstPort: NOBODY });
          await vm.guest.waitFor(() => rstFor(cap.packets, p), 5000, "an RST in a driver buffer");
        }
        assert.ok(port - first >= 4);
        const elsewhere = vm.faults.allocGuest(256);
        /** ports probed whose RST has not been seen in a raw buffer yet, oldest first */
        const owed: number[] = [];
        let rejected = 0;
        const expectRst = (bytes: Uint8Array, what: string) => {
          const h = new PacketHeader().decodeFrom(new DataView(bytes.buffer), 0);
          assert.equal(h.op, VIRTIO_VSOCK_OP_RST, `${what}: ${h.describe()}`);
          assert.equal(h.dstPort, owed.shift(), `${what}: the oldest RST owed`);
        };
        for (let i = 0; i < REGIONS.length; i++) {
          const { end, adjacent } = edge(vm, i);
          const read = (gpa: number, len: number) => readWherever(vm, gpa, len);
          const cases: [string, RawDescriptor[], boolean, () => Uint8Array][] = [
            [
              "buffer ending at the end",
              [{ addr: end - 44, len: 44, flags: VRING_DESC_F_WRITE }],
              true,
              () => read(end - 44, 44),
            ],
            [
              "header split, second part ending at the end",
              [
                { addr: end - 200, len: 20, flags: VRING_DESC_F_WRITE | VRING_DESC_F_NEXT },
                { addr: end - 24, len: 24, flags: VRING_DESC_F_WRITE },
              ],
              true,
              () => new Uint8Array([...read(end - 200, 20), ...read(end - 24, 24)]),
            ],
            [
              "buffer one byte past the end",
              [{ addr: end - 43, len: 44, flags: VRING_DESC_F_WRITE }],
              adjacent,
              () => read(end - 43, 44),
            ],
            [
              "indirect table ending at the end",
              [{
                addr: end - 16,
                len: 16,
                flags: VRING_DESC_F_INDIRECT,
              }],
              true,
              () => read(elsewhere, 44),
            ],
            [
              "indirect table one byte past the end",
              [{
                addr: end - 15,
                len: 16,
                flags: VRING_DESC_F_INDIRECT,
              }],
              false,
              () => read(elsewhere, 44),
            ],
          ];
          for (const [what, descs, ok, got] of cases) {
            const at = `${what} of region ${i}`;
            const t = table(vm, [{ addr: elsewhere, len: 44, flags: VRING_DESC_F_WRITE }]);
            if (descs[0].flags & VRING_DESC_F_INDIRECT) {
              writeWherever(vm, Number(descs[0].addr), t);
            }
            if (owed.length === 0) {
              owed.push(port);
              vm.faults.sendRawPacket({ srcPort: port++, dstPort: NOBODY });
            }
            const len = await submit(vm, VSOCK_VQ_RX, descs);
            if (ok) {
              assert.equal(len, VIRTIO_VSOCK_HDR_SIZE, `${at}: used len`);
              expectRst(got(), at);
            } else {
              assert.equal(len, 0, `${at}: used len`);
              rejected++;
            }
          }
        }
        await expectInvalidLines(vm, "rx", rejected);
        // The device still works with ordinary buffers.
        vm.faults.refillRx();
        const p = port++;
        vm.faults.sendRawPacket({ srcPort: p, dstPort: NOBODY });
        await vm.guest.waitFor(() => rstFor(cap.packets, p), 5000, "an RST after the edge cases");
      });
    }),
  );
}
