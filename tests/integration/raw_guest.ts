/**
 * A bare virtio-vsock guest for the lost-wakeup tests ("kick after start", "never drop a kick"):
 * `RawGuest` lays out the three rings (split, or packed when VIRTIO_F_RING_PACKED is offered),
 * posts buffers and sends packets only when told, and kicks only through `kick()`, so a test
 * controls exactly which notifications exist; `RawHostSocket` is a host app on a raw
 * non-blocking Unix socket, so a test can check "nothing yet" at once.
 */
import assert from "node:assert/strict";
import { close, connectUnix, EAGAIN, readRaw, writeRaw } from "../../ffi/mod.ts";
import {
  type GuestRam,
  LINUX_DRIVER_FEATURES,
  PacketHeader,
  type QueueSetup,
  type VhostUserFrontEnd,
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_TYPE_STREAM,
} from "../../lib/testing/mod.ts";
import {
  allocDriverRing,
  type AnyDriverQueue,
  ringFeatures,
} from "../../lib/testing/driver_rings.ts";
import { VIRTIO_RING_F_EVENT_IDX_MASK } from "../../lib/virtio/features.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();
export const HOST_CID = 2;
export const GUEST_CID = 3;

/** Polls `pred` every 2 ms (sleeping, not spinning) until it holds; throws after `timeoutMs`. */
export async function waitUntil(
  pred: () => boolean,
  timeoutMs: number,
  what: string,
): Promise<number> {
  const t0 = performance.now();
  for (;;) {
    if (pred()) return performance.now() - t0;
    if (performance.now() - t0 > timeoutMs) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** A host app on a raw non-blocking Unix socket (so a test can check "nothing yet" at once). */
export class RawHostSocket {
  readonly #buf = new Uint8Array(65536);
  readonly received: number[] = [];
  eof = false;
  constructor(readonly fd: number) {}

  static connect(path: string): RawHostSocket {
    return new RawHostSocket(connectUnix(path));
  }

  send(text: string): void {
    const b = enc.encode(text);
    assert.equal(writeRaw(this.fd, b), b.length, "host write");
  }

  /** Reads what is there now; notes EOF (or a reset). */
  poll(): void {
    for (;;) {
      const n = readRaw(this.fd, this.#buf);
      if (n === -EAGAIN) return;
      if (n <= 0) {
        this.eof = true;
        return;
      }
      for (let i = 0; i < n; i++) this.received.push(this.#buf[i]);
    }
  }

  text(): string {
    return dec.decode(new Uint8Array(this.received));
  }

  async waitText(want: string, timeoutMs: number): Promise<void> {
    await waitUntil(
      () => {
        this.poll();
        return this.text().includes(want) || this.eof;
      },
      timeoutMs,
      `"${want.trim()}" from the back end`,
    );
    assert.ok(this.text().includes(want), `host got ${JSON.stringify(this.text())}, EOF`);
  }

  close(): void {
    close(this.fd);
  }
}

/** A packet the RawGuest received. */
export interface RxPacket {
  readonly header: PacketHeader;
  readonly payload: Uint8Array;
}

/**
 * A bare virtio-vsock driver: split rings in guest RAM (packed when the front end offers
 * VIRTIO_F_RING_PACKED: its `packed` option), buffers posted and packets sent only when the
 * test says, and a kick only through `kick()`. It counts its kicks, so a test can prove that
 * something arrived without any.
 */
export class RawGuest {
  readonly queues: AnyDriverQueue[] = [];
  readonly setups: QueueSetup[] = [];
  readonly features: bigint;
  readonly received: RxPacket[] = [];
  kicks = 0;
  readonly #rxHeads = new Map<number, number>();
  readonly #txHeads = new Map<number, number>();
  readonly #free: number[] = [];
  readonly #mem: GuestRam;

  constructor(readonly fe: VhostUserFrontEnd, opts: { eventIdx?: boolean } = {}) {
    this.#mem = fe.memory;
    let f = fe.deviceFeatures() & LINUX_DRIVER_FEATURES;
    if (opts.eventIdx === false) f &= ~VIRTIO_RING_F_EVENT_IDX_MASK;
    this.features = f;
    const rings = ringFeatures(f);
    const alloc = (bytes: number, align: number) => this.#mem.alloc(bytes, align);
    for (let i = 0; i < 3; i++) {
      const ring = allocDriverRing(this.#mem, alloc, i, fe.queueSize, rings);
      this.queues.push(ring.queue);
      this.setups.push(ring.setup);
    }
  }

  get rx(): AnyDriverQueue {
    return this.queues[0];
  }
  get tx(): AnyDriverQueue {
    return this.queues[1];
  }

  #buffer(): number {
    return this.#free.pop() ?? this.#mem.alloc(VIRTIO_VSOCK_HDR_SIZE + 4096, 64);
  }

  /** Posts `n` rx buffers and publishes them; returns whether the device asked for a kick. */
  postRx(n: number): boolean {
    for (let i = 0; i < n; i++) {
      const gpa = this.#buffer();
      const head = this.rx.addBuffer([{
        gpa,
        len: VIRTIO_VSOCK_HDR_SIZE + 4096,
        writable: true,
      }]);
      assert.ok(head >= 0, "rx descriptors free");
      this.#rxHeads.set(head, gpa);
    }
    this.rx.publish();
    return this.rx.kickNeeded();
  }

  /** Puts one packet on the tx ring and publishes it; returns whether a kick is needed. */
  send(fields: Partial<PacketHeader>, payload = new Uint8Array(0)): boolean {
    const h = new PacketHeader();
    h.srcCid = GUEST_CID;
    h.dstCid = HOST_CID;
    h.type = VIRTIO_VSOCK_TYPE_STREAM;
    h.op = VIRTIO_VSOCK_OP_RW;
    h.bufAlloc = 256 * 1024;
    Object.assign(h, fields);
    h.len = payload.length;
    const gpa = this.#buffer();
    const b = this.#mem.bytesAt(gpa, VIRTIO_VSOCK_HDR_SIZE + payload.length);
    h.encodeTo(new DataView(b.buffer, b.byteOffset, b.length), 0);
    b.set(payload, VIRTIO_VSOCK_HDR_SIZE);
    const segs = [{ gpa, len: VIRTIO_VSOCK_HDR_SIZE, writable: false }];
    if (payload.length > 0) {
      segs.push({ gpa: gpa + VIRTIO_VSOCK_HDR_SIZE, len: payload.length, writable: false });
    }
    const head = this.tx.addBuffer(segs);
    assert.ok(head >= 0, "tx descriptors free");
    this.#txHeads.set(head, gpa);
    this.tx.publish();
    return this.tx.kickNeeded();
  }

  /** Notifies queue `i` (the only way this driver ever kicks). */
  kick(i: number): void {
    this.kicks++;
    this.fe.kick(i);
  }

  /** Reaps both used rings; received packets are appended to `received`. */
  reap(): void {
    for (let u = this.tx.popUsed(); u !== null; u = this.tx.popUsed()) {
      const gpa = this.#txHeads.get(u.head);
      assert.ok(gpa !== undefined, `tx used head ${u.head} was outstanding`);
      this.#txHeads.delete(u.head);
      this.#free.push(gpa);
    }
    for (let u = this.rx.popUsed(); u !== null; u = this.rx.popUsed()) {
      const gpa = this.#rxHeads.get(u.head);
      assert.ok(gpa !== undefined, `rx used head ${u.head} was outstanding`);
      this.#rxHeads.delete(u.head);
      assert.ok(u.len >= VIRTIO_VSOCK_HDR_SIZE, `rx used len ${u.len}`);
      const b = this.#mem.bytesAt(gpa, u.len);
      const header = new PacketHeader().decodeFrom(new DataView(b.buffer, b.byteOffset, u.len), 0);
      const payload = b.slice(VIRTIO_VSOCK_HDR_SIZE, VIRTIO_VSOCK_HDR_SIZE + header.len);
      this.received.push({ header, payload });
      this.#free.push(gpa);
    }
  }

  /** Waits (reaping, never kicking) for a received packet matching `pred`. */
  async waitPacket(
    pred: (p: RxPacket) => boolean,
    timeoutMs: number,
    what: string,
  ): Promise<RxPacket> {
    let found: RxPacket | undefined;
    await waitUntil(
      () => {
        this.reap();
        found = this.received.find(pred);
        return found !== undefined;
      },
      timeoutMs,
      `${what} (received so far: ${this.describeReceived()})`,
    );
    return found!;
  }

  describeReceived(): string {
    return `[${this.received.map((p) => p.header.describe()).join("; ")}]`;
  }

  /** The profile's DRIVER_OK sequence (SET_VRING_KICK ... SET_VRING_ENABLE ...). */
  startDevice(): void {
    this.fe.startDevice(this.features, this.setups);
  }

  /**
   * The ring set-up half of a start, by hand: SET_FEATURES, SET_MEM_TABLE, then per back-end
   * queue SET_VRING_NUM/BASE/ADDR/CALL/KICK. The rings are started, not enabled yet.
   */
  setupRings(opts: { needReply?: boolean } = {}): void {
    const fe = this.fe;
    fe.setFeatures(fe.backendFeaturesFor(this.features), opts);
    fe.setMemTable(fe.memory.regions, opts);
    for (const q of this.setups) {
      if (!fe.ownsQueue(q.index)) continue;
      fe.setVringNum(q.index, q.size, opts);
      fe.setVringBase(q.index, q.base, opts);
      fe.setVringAddr(q.index, q, opts);
      fe.setVringCall(q.index, undefined, opts);
      fe.setVringKick(q.index, undefined, opts);
    }
  }

  /** SET_VRING_ENABLE 1 on every back-end queue. */
  enableRings(opts: { needReply?: boolean } = {}): void {
    for (const q of this.setups) {
      if (this.fe.ownsQueue(q.index)) this.fe.setVringEnable(q.index, true, opts);
    }
  }
}
