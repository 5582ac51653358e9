/**
 * The connection state machine on its own, without virtqueues (as Firecracker's csm tests
 * do): a `VsockConnection` over a real host socket pair, handed descriptor chains built by
 * hand over real guest RAM, with a recording context in place of the muxer.
 */
import assert from "node:assert/strict";
import {
  close,
  MessageIo,
  readRaw,
  SHUT_WR,
  shutdownRaw,
  SOCK_SEQPACKET,
  unixSocketPair,
  writeRaw,
} from "../../ffi/mod.ts";
import { Reactor } from "../../lib/reactor.ts";
import { DescChain } from "../../lib/virtio/desc_chain.ts";
import {
  type ConnectionContext,
  ConnState,
  Pending,
  VsockConnection,
} from "../../lib/vsock/connection.ts";
import {
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_OP_CREDIT_REQUEST,
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RESPONSE,
  VIRTIO_VSOCK_OP_RST,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_OP_SHUTDOWN,
  VIRTIO_VSOCK_SEQ_EOM,
  VIRTIO_VSOCK_SHUTDOWN_F_BOTH,
  VIRTIO_VSOCK_SHUTDOWN_F_SEND,
  VIRTIO_VSOCK_TYPE_SEQPACKET,
} from "../../lib/vsock/constants.ts";
import { HeaderScratch, PacketHeader } from "../../lib/vsock/packet.ts";
import { newDeviceStats } from "../../lib/vsock/stats.ts";
import { TxGather } from "../../lib/vsock/tx_gather.ts";
import { WindowAutotune } from "../../lib/vsock/autotune.ts";
import { GuestRam } from "../../lib/testing/guest_ram.ts";
import { PlainGuestMemory } from "../../lib/virtio/memory.ts";

const GUEST_CID = 3;
const BUF = 64 * 1024;

/** A context that records what the connection asks of the muxer. */
class Ctx implements ConnectionContext {
  readonly reactor = new Reactor();
  readonly guestCid = GUEST_CID;
  readonly stats = newDeviceStats();
  readonly gather = new TxGather();
  readonly iov = new BigUint64Array(2 * 64);
  readonly msgIo = new MessageIo();
  readonly rxChains = null;
  autotune: WindowAutotune | null = null;
  readonly scratch = new HeaderScratch();
  readonly header = this.scratch.h;
  scheduled = 0;
  forgotten: VsockConnection[] = [];
  accepted: number[] = [];
  emit(chain: DescChain): void {
    this.scratch.writeTo(chain);
  }
  scheduleRx(_c: VsockConnection): void {
    this.scheduled++;
  }
  forget(c: VsockConnection): void {
    this.forgotten.push(c);
  }
  guestAccepted(port: number): void {
    this.accepted.push(port);
  }
  events: string[] = [];
  logEvent(msg: string): void {
    this.events.push(msg);
  }
  logFault(msg: string): void {
    this.events.push(msg);
  }
}

/** Guest RAM plus helpers to build tx and rx chains by hand. */
class Guest {
  readonly ram: GuestRam;
  constructor(size = 1 << 20) {
    this.ram = new GuestRam({ regions: [{ gpa: 0, size }] });
  }
  readonly chain = new DescChain(16);

  /** A tx chain: header + payload in one readable buffer. */
  tx(h: PacketHeader, payload: Uint8Array = new Uint8Array(0)): DescChain {
    const gpa = this.ram.alloc(VIRTIO_VSOCK_HDR_SIZE + payload.length + 1);
    const bytes = new Uint8Array(VIRTIO_VSOCK_HDR_SIZE + payload.length);
    h.len = payload.length;
    h.encodeTo(new DataView(bytes.buffer), 0);
    bytes.set(payload, VIRTIO_VSOCK_HDR_SIZE);
    this.ram.write(gpa, bytes);
    return this.#one(gpa, bytes.length, false);
  }

  /** An rx chain of `size` writable bytes. */
  rx(size: number): DescChain {
    return this.#one(this.ram.alloc(size), size, true);
  }

  /** The header and payload the device wrote into the last rx chain. */
  written(c: DescChain): { h: PacketHeader; payload: Uint8Array } {
    const gpa = c.gpaOf(0);
    const bytes = this.ram.read(gpa, c.len[0]);
    const h = new PacketHeader().decodeFrom(new DataView(bytes.buffer), 0);
    return { h, payload: bytes.slice(VIRTIO_VSOCK_HDR_SIZE, VIRTIO_VSOCK_HDR_SIZE + h.len) };
  }

  #one(gpa: number, len: number, writable: boolean): DescChain {
    const c = this.chain;
    c.reset(this.ram, 0);
    c.region[0] = 0;
    c.offset[0] = gpa;
    c.len[0] = len;
    c.count = 1;
    c.readableCount = writable ? 0 : 1;
    c.readableLen = writable ? 0 : len;
    c.writableLen = writable ? len : 0;
    return c;
  }
}

function guestHeader(op: number, conn: VsockConnection, flags = 0): PacketHeader {
  const h = new PacketHeader();
  h.type = conn.type;
  h.srcCid = GUEST_CID;
  h.dstCid = 2;
  h.srcPort = conn.peerPort;
  h.dstPort = conn.localPort;
  h.op = op;
  h.flags = flags;
  h.bufAlloc = BUF;
  h.fwdCnt = 0;
  return h;
}

/** The guest sends `op` (with `payload`) on `c`: header and chain as the muxer would hand them. */
function send(g: Guest, c: VsockConnection, op: number, payload?: Uint8Array, flags = 0): void {
  const h = guestHeader(op, c, flags);
  const chain = g.tx(h, payload);
  c.onGuestPacket(h, chain);
}

/** A guest-initiated, established connection to host port 5000 over a socket pair. */
function established(ctx: Ctx): { c: VsockConnection; app: number } {
  const [ours, app] = unixSocketPair();
  const c = new VsockConnection(ctx, 5000, 1234, ours, ConnState.ESTABLISHED, BUF, false);
  c.credit.updateFromPeer(BUF, 0);
  c.watchHost();
  return { c, app };
}

function readAll(fd: number, n: number): Uint8Array {
  const out = new Uint8Array(n);
  let got = 0;
  while (got < n) {
    const r = readRaw(fd, out.subarray(got));
    if (r <= 0) break;
    got += r;
  }
  return out.subarray(0, got);
}

Deno.test("connection: guest RW reaches the host socket and credit comes back", () => {
  const ctx = new Ctx();
  const g = new Guest();
  const { c, app } = established(ctx);
  try {
    const data = new TextEncoder().encode("hello host");
    send(g, c, VIRTIO_VSOCK_OP_RW, data);
    ctx.gather.flush();
    assert.deepEqual(readAll(app, data.length), data);
    assert.equal(c.credit.fwdCnt, data.length);
    assert.equal(ctx.stats.txBytes, data.length);
  } finally {
    c.destroy(false);
    close(app);
    ctx.reactor.close();
    g.ram.close();
  }
});

Deno.test("connection: host bytes become one RW packet with our credit stamped", () => {
  const ctx = new Ctx();
  const g = new Guest();
  const { c, app } = established(ctx);
  try {
    writeRaw(app, new TextEncoder().encode("from the host"));
    c.hostReadable = true;
    assert.ok(c.hasRxWork());
    const rx = g.rx(4096);
    const len = c.fillRx(rx);
    const { h, payload } = g.written(rx);
    assert.equal(len, VIRTIO_VSOCK_HDR_SIZE + 13);
    assert.equal(h.op, VIRTIO_VSOCK_OP_RW);
    assert.equal(h.srcPort, 5000);
    assert.equal(h.dstPort, 1234);
    assert.equal(h.dstCid, GUEST_CID);
    assert.equal(h.bufAlloc, BUF);
    assert.equal(new TextDecoder().decode(payload), "from the host");
    assert.equal(c.credit.txCnt, 13);
    // Nothing more on the socket: no packet, and the connection stops asking.
    assert.equal(c.fillRx(g.rx(4096)), -1);
    assert.equal(c.hasRxWork(), false);
  } finally {
    c.destroy(false);
    close(app);
    ctx.reactor.close();
    g.ram.close();
  }
});

Deno.test("connection: half-close both ways, then RST and the host socket closed", () => {
  const ctx = new Ctx();
  const g = new Guest();
  const { c, app } = established(ctx);
  try {
    // Host EOF -> SHUTDOWN(SEND) only.
    shutdownRaw(app, SHUT_WR);
    c.hostReadable = true;
    const rx = g.rx(4096);
    assert.equal(c.fillRx(rx), VIRTIO_VSOCK_HDR_SIZE); // reads EOF, sends SHUTDOWN at once
    assert.ok(c.hostEof);
    const { h } = g.written(rx);
    assert.equal(h.op, VIRTIO_VSOCK_OP_SHUTDOWN);
    assert.equal(h.flags, VIRTIO_VSOCK_SHUTDOWN_F_SEND);
    assert.equal(c.state, ConnState.ESTABLISHED);
    // Guest SHUTDOWN(SEND): the host app reads EOF; both directions done -> RST owed.
    send(g, c, VIRTIO_VSOCK_OP_SHUTDOWN, undefined, VIRTIO_VSOCK_SHUTDOWN_F_SEND);
    assert.equal(c.state, ConnState.CLOSED);
    assert.equal(c.pending, Pending.RST);
    assert.deepEqual(ctx.forgotten, [c]);
    const rst = g.rx(4096);
    assert.equal(c.fillRx(rst), VIRTIO_VSOCK_HDR_SIZE);
    assert.equal(g.written(rst).h.op, VIRTIO_VSOCK_OP_RST);
    assert.equal(readRaw(app, new Uint8Array(8)), 0); // EOF: our end is closed
  } finally {
    close(app);
    ctx.reactor.close();
    g.ram.close();
  }
});

Deno.test("connection: host-initiated REQUEST, RESPONSE writes OK, CREDIT_REQUEST is answered", () => {
  const ctx = new Ctx();
  const g = new Guest();
  const [ours, app] = unixSocketPair();
  const c = new VsockConnection(ctx, 1 << 30, 7000, ours, ConnState.CONNECTING, BUF, true);
  try {
    c.offerToGuest(60_000);
    const req = g.rx(4096);
    assert.equal(c.fillRx(req), VIRTIO_VSOCK_HDR_SIZE);
    assert.equal(g.written(req).h.op, VIRTIO_VSOCK_OP_REQUEST);
    send(g, c, VIRTIO_VSOCK_OP_RESPONSE);
    assert.equal(c.state, ConnState.ESTABLISHED);
    assert.equal(c.timer, null);
    assert.deepEqual(ctx.accepted, [7000]);
    assert.equal(new TextDecoder().decode(readAll(app, 14)), `OK ${1 << 30}\n`);
    send(g, c, VIRTIO_VSOCK_OP_CREDIT_REQUEST);
    const upd = g.rx(4096);
    assert.equal(c.fillRx(upd), VIRTIO_VSOCK_HDR_SIZE);
    assert.equal(g.written(upd).h.bufAlloc, BUF);
  } finally {
    c.destroy(false);
    close(app);
    ctx.reactor.close();
    g.ram.close();
  }
});

Deno.test("connection: a guest that exceeds our credit is reset", () => {
  const ctx = new Ctx();
  const g = new Guest();
  const [ours, app] = unixSocketPair();
  const c = new VsockConnection(ctx, 5000, 1234, ours, ConnState.ESTABLISHED, 16, false);
  try {
    send(g, c, VIRTIO_VSOCK_OP_RW, new Uint8Array(17));
    assert.equal(c.state, ConnState.CLOSED);
    assert.equal(c.pending, Pending.RST);
  } finally {
    close(app);
    ctx.reactor.close();
    g.ram.close();
  }
});

Deno.test("connection: a guest close with bytes still queued drains them before the RST", () => {
  const ctx = new Ctx();
  const g = new Guest();
  const { c, app } = established(ctx);
  try {
    // The app does not read: fill its socket, the rest waits in toHost.
    const chunk = new Uint8Array(60_000).fill(7);
    let sent = 0;
    while (c.toHost.length === 0 && sent < 4 << 20) {
      send(g, c, VIRTIO_VSOCK_OP_RW, chunk);
      ctx.gather.flush();
      sent += chunk.length;
      // Return credit as the guest would see it, so it may keep sending.
      c.credit.rxLimit = Infinity;
    }
    assert.ok(c.toHost.length > 0, "the host socket never filled");
    send(g, c, VIRTIO_VSOCK_OP_SHUTDOWN, undefined, VIRTIO_VSOCK_SHUTDOWN_F_BOTH);
    assert.equal(c.state, ConnState.ESTABLISHED);
    assert.ok(c.closeWhenFlushed);
    const got = readAll(app, sent);
    assert.equal(got.length, sent - c.toHost.length);
    c.flushToHost();
    const rest = readAll(app, sent);
    assert.equal(got.length + rest.length, sent);
    assert.equal(c.state, ConnState.CLOSED);
    assert.equal(c.pending, Pending.RST);
  } finally {
    c.destroy(false);
    close(app);
    ctx.reactor.close();
    g.ram.close();
  }
});

Deno.test("tx gather: bytes the socket does not take are copied from the right region", () => {
  // PlainGuestMemory gives every region host address 0, so finding a region by host address
  // picks the first one; the gather must copy through the chain's own segments instead. A
  // full socket answers writev with EAGAIN before touching the iovecs.
  const ctx = new Ctx();
  const mem = new PlainGuestMemory([{ gpa: 0, size: 4096 }, { gpa: 0x10000, size: 4096 }]);
  mem.regions[0].bytes.fill(0xaa);
  const payload = new TextEncoder().encode("bytes of region one");
  const hdr = new Uint8Array(VIRTIO_VSOCK_HDR_SIZE);
  const [ours, app] = unixSocketPair();
  const c = new VsockConnection(ctx, 5000, 1234, ours, ConnState.ESTABLISHED, BUF, false);
  try {
    const fill = new Uint8Array(65536);
    while (writeRaw(ours, fill) > 0) { /* fill the socket */ }
    const h = new PacketHeader();
    h.len = payload.length;
    h.encodeTo(new DataView(hdr.buffer), 0);
    mem.regions[1].bytes.set(hdr, 100);
    mem.regions[1].bytes.set(payload, 100 + VIRTIO_VSOCK_HDR_SIZE);
    const chain = new DescChain(4);
    chain.reset(mem, 0);
    chain.region[0] = 1;
    chain.offset[0] = 100;
    chain.len[0] = VIRTIO_VSOCK_HDR_SIZE + payload.length;
    chain.count = 1;
    chain.readableCount = 1;
    chain.readableLen = chain.len[0];
    assert.ok(ctx.gather.add(c, chain, payload.length));
    ctx.gather.flush();
    assert.equal(c.state, ConnState.ESTABLISHED);
    assert.deepEqual(c.toHost.front(), payload);
  } finally {
    c.destroy(false);
    close(app);
    ctx.reactor.close();
  }
});

/** A guest-initiated seqpacket connection over a SOCK_SEQPACKET pair. */
function seqpacket(ctx: Ctx, guestBuf = BUF): { c: VsockConnection; app: number } {
  const [ours, app] = unixSocketPair(SOCK_SEQPACKET);
  const c = new VsockConnection(
    ctx,
    5000,
    1234,
    ours,
    ConnState.ESTABLISHED,
    BUF,
    false,
    VIRTIO_VSOCK_TYPE_SEQPACKET,
  );
  c.credit.updateFromPeer(guestBuf, 0);
  c.watchHost();
  return { c, app };
}

Deno.test("seqpacket: a guest message in three packets is one host record", () => {
  const ctx = new Ctx();
  const g = new Guest();
  const { c, app } = seqpacket(ctx);
  try {
    send(g, c, VIRTIO_VSOCK_OP_RW, new Uint8Array(100).fill(1));
    send(g, c, VIRTIO_VSOCK_OP_RW, new Uint8Array(100).fill(2));
    assert.equal(readRaw(app, new Uint8Array(1000)) < 0, true, "nothing before EOM");
    send(g, c, VIRTIO_VSOCK_OP_RW, new Uint8Array(50).fill(3), VIRTIO_VSOCK_SEQ_EOM);
    send(g, c, VIRTIO_VSOCK_OP_RW, new Uint8Array(7).fill(4), VIRTIO_VSOCK_SEQ_EOM);
    const rec = new Uint8Array(1000);
    assert.equal(readRaw(app, rec), 250, "one record of the three packets");
    assert.deepEqual([rec[0], rec[100], rec[200], rec[249]], [1, 2, 3, 3]);
    assert.equal(readRaw(app, rec), 7, "the next message is the next record");
    assert.equal(c.credit.fwdCnt, 257);
  } finally {
    c.destroy(false);
    close(app);
    ctx.reactor.close();
    g.ram.close();
  }
});

Deno.test("seqpacket: a host record becomes packets with EOM on the last only", () => {
  const ctx = new Ctx();
  const g = new Guest();
  const { c, app } = seqpacket(ctx);
  try {
    const msg = new Uint8Array(10_000).map((_, i) => i & 0xff);
    writeRaw(app, msg);
    writeRaw(app, new Uint8Array(5).fill(9));
    c.hostReadable = true;
    const got: number[] = [];
    const flags: number[] = [];
    for (let i = 0; i < 4; i++) {
      const rx = g.rx(4096 + VIRTIO_VSOCK_HDR_SIZE);
      assert.ok(c.fillRx(rx) > VIRTIO_VSOCK_HDR_SIZE);
      const { h, payload } = g.written(rx);
      assert.equal(h.type, VIRTIO_VSOCK_TYPE_SEQPACKET);
      got.push(payload.length);
      flags.push(h.flags);
    }
    assert.deepEqual(got, [4096, 4096, 1808, 5]);
    assert.deepEqual(flags, [0, 0, VIRTIO_VSOCK_SEQ_EOM, VIRTIO_VSOCK_SEQ_EOM]);
  } finally {
    c.destroy(false);
    close(app);
    ctx.reactor.close();
    g.ram.close();
  }
});

Deno.test("seqpacket: a host message larger than the guest's buffer is refused with RST", () => {
  const ctx = new Ctx();
  const g = new Guest();
  const { c, app } = seqpacket(ctx, 8192);
  try {
    writeRaw(app, new Uint8Array(8193));
    c.hostReadable = true;
    assert.equal(c.fillRx(g.rx(4096)), -1); // reads the size, refuses, owes an RST
    assert.equal(c.state, ConnState.CLOSED);
    const rx = g.rx(4096);
    assert.equal(c.fillRx(rx), VIRTIO_VSOCK_HDR_SIZE);
    assert.equal(g.written(rx).h.op, VIRTIO_VSOCK_OP_RST);
    assert.ok(ctx.events.some((e) => /8193-byte host message is larger/.test(e)));
  } finally {
    close(app);
    ctx.reactor.close();
    g.ram.close();
  }
});

Deno.test("autotune: a window-bound guest with a fast host app gets a larger window, within the budget", () => {
  const ctx = new Ctx();
  ctx.autotune = new WindowAutotune(448 * 1024, 4 << 20);
  const g = new Guest(64 << 20);
  const { c, app } = established(ctx);
  try {
    const chunk = new Uint8Array(32 * 1024);
    const sink = new Uint8Array(1 << 20);
    const windows: number[] = [];
    for (let i = 0; i < 64; i++) {
      // The guest sends as much as the window allows, the app reads it all at once.
      while (c.credit.peerSeenFree() >= chunk.length) {
        send(g, c, VIRTIO_VSOCK_OP_RW, chunk);
        ctx.gather.flush();
      }
      while (readRaw(app, sink) > 0) { /* drain */ }
      const upd = g.rx(4096);
      if (c.fillRx(upd) > 0) windows.push(g.written(upd).h.bufAlloc);
    }
    assert.equal(windows[0] > BUF, true, `the first update already grows: ${windows[0]}`);
    assert.equal(Math.max(...windows), 512 * 1024, "64 KiB + a 448 KiB budget");
    assert.equal(ctx.autotune.reserved, 448 * 1024);
    c.destroy(false);
    assert.equal(ctx.autotune.reserved, 0, "the growth is returned on close");
  } finally {
    close(app);
    ctx.reactor.close();
    g.ram.close();
  }
});

Deno.test("autotune: no growth while the host app is slow (bytes wait in the backlog)", () => {
  const ctx = new Ctx();
  ctx.autotune = new WindowAutotune();
  const g = new Guest();
  const { c, app } = established(ctx);
  try {
    const fill = new Uint8Array(65536);
    while (writeRaw(c.hostFd, fill) > 0) { /* the app's socket is full */ }
    send(g, c, VIRTIO_VSOCK_OP_RW, new Uint8Array(60_000));
    ctx.gather.flush();
    assert.ok(c.toHost.length > 0);
    assert.equal(c.credit.bufAlloc, BUF);
    assert.equal(ctx.autotune.reserved, 0);
  } finally {
    c.destroy(false);
    close(app);
    ctx.reactor.close();
    g.ram.close();
  }
});

Deno.test("tx gather: a payload never overtakes bytes a flush left in the backlog", () => {
  // Found with autotuned windows: a gather run that hit its byte limit flushed into a full
  // socket (the rest went to toHost), then the next payload was gathered again and written
  // straight to the socket once the app had read: ahead of the backlog.
  const ctx = new Ctx();
  const g = new Guest(8 << 20);
  const [ours, app] = unixSocketPair();
  const c = new VsockConnection(ctx, 5000, 1234, ours, ConnState.ESTABLISHED, 2 << 20, false);
  c.credit.updateFromPeer(BUF, 0);
  try {
    const filler = new Uint8Array(65536);
    let filled = 0;
    for (let n; (n = writeRaw(ours, filler)) > 0;) filled += n;
    for (let i = 1; i <= 9; i++) {
      send(g, c, VIRTIO_VSOCK_OP_RW, new Uint8Array(65536).fill(i)); // the 9th passes 512 KiB
    }
    const sink = new Uint8Array(1 << 20);
    let drained = 0;
    for (let n; (n = readRaw(app, sink)) > 0;) drained += n; // the app reads meanwhile
    assert.equal(drained, filled);
    ctx.gather.flush();
    const got = new Uint8Array(9 * 65536);
    let have = 0;
    for (let round = 0; round < 100 && have < got.length; round++) {
      c.flushToHost();
      for (let n; (n = readRaw(app, got.subarray(have))) > 0;) have += n;
    }
    assert.equal(have, got.length);
    for (let i = 0; i < 9; i++) assert.equal(got[i * 65536], i + 1, `packet ${i + 1} in place`);
  } finally {
    c.destroy(false);
    close(app);
    ctx.reactor.close();
    g.ram.close();
  }
});

Deno.test("seqpacket: messages that wrap around the end of the backlog ring go out whole", () => {
  const ctx = new Ctx();
  const g = new Guest();
  const { c, app } = seqpacket(ctx);
  try {
    // 20 KB messages into a 64 KiB backlog while the app reads only now and then: the
    // backlog's front moves on and later messages wrap around the end of its ring.
    const size = 20_000;
    const sentSizes: number[] = [];
    const rec = new Uint8Array(65536);
    let read = 0;
    let wrapped = false;
    for (let i = 0; i < 40; i++) {
      if (c.toHost.free < size) { // the app reads one record; the connection flushes
        const n = readRaw(app, rec);
        assert.equal(n, sentSizes[read], `record ${read}`);
        assert.ok(rec.subarray(0, n).every((b) => b === (read & 0xff)), `record ${read} content`);
        read++;
        c.flushToHost();
      }
      if (c.toHost.free < size) break;
      c.credit.rxLimit = Infinity; // the guest sees its credit back
      send(g, c, VIRTIO_VSOCK_OP_RW, new Uint8Array(size).fill(i & 0xff), VIRTIO_VSOCK_SEQ_EOM);
      sentSizes.push(size);
      if (c.toHost.length > 0 && c.toHost.peek(Math.min(size, c.toHost.length))[1].length > 0) {
        wrapped = true;
      }
    }
    for (; read < sentSizes.length; read++) {
      c.flushToHost();
      const n = readRaw(app, rec);
      assert.equal(n, sentSizes[read], `record ${read}`);
      assert.ok(rec.subarray(0, n).every((b) => b === (read & 0xff)), `record ${read} content`);
    }
    assert.ok(wrapped, "a queued message wrapped around the end of the ring");
  } finally {
    c.destroy(false);
    close(app);
    ctx.reactor.close();
    g.ram.close();
  }
});
