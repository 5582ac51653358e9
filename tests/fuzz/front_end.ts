/**
 * The front-end fuzzer: a hostile VMM against a back end spawned with `spawnBackend`
 * (issue "Hostile inputs", the fuzz campaign). It speaks raw vhost-user
 * (`docs/interop/vhost-user.rst`: 12-byte header, payload, fds as SCM_RIGHTS) and sends,
 * from a seeded PRNG:
 *
 * - known request ids with plausible but hostile payloads: out-of-range vring indices,
 *   ring addresses inside, across and far outside the shared memory, huge sizes and
 *   offsets, SET_MEM_TABLE with overlapping regions, features never offered, device state
 *   transfers over pipes whose other end stays open;
 * - known ids with random payloads and wrong sizes, unknown ids;
 * - wrong fd counts, and fds that are not memfds (eventfds, pipe ends, sockets);
 * - truncated messages (then a hang-up), framing errors, kicks on the ring eventfds;
 * - a VMM's realize sequence, in order or shuffled, over shared memory full of random
 *   bytes, so rings really start over garbage;
 * - reconnects.
 *
 * Invariants after every step (a failure throws, naming the seed and the last steps):
 * - the back end process is alive;
 * - on the fuzzing connection, a GET_FEATURES probe gets its reply within the deadline
 *   (100 ms), or the connection is closed: never a silent hang. Replies come in request
 *   order: one for each request that always has one, none for a request without NEED_REPLY
 *   (SET_LOG_BASE may have one), no stray or malformed reply;
 * - after a hang-up, a fresh front end's GET_FEATURES is answered within the deadline;
 * - its fd count, RSS and stderr line rate stay bounded, and no exception escapes to the
 *   reactor (`reactor: handler ... threw`): a front end's input is never an internal error.
 *
 * A reply later than the deadline but within `LATE_GRACE_MS` is counted as late (the
 * machine may be loaded); more than `MAX_LATE` late replies (plus one per `LATE_PER`
 * messages on long runs), or one beyond the grace, fail.
 */

import { mulberry32 } from "./prng.ts";
import {
  close,
  eventFd,
  eventFdWrite,
  memfdCreate,
  pipe,
  rssBytes,
  unixSocketPair,
  writeRaw,
} from "../../ffi/mod.ts";
import { type BackendProcess, spawnBackend } from "../../lib/testing/mod.ts";
import { encodeMessage } from "../../lib/vhost_user/messages.ts";
import {
  ALWAYS_REPLIED_REQUESTS,
  requestName,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_VERSION,
  VhostUserProtocolFeatureMask as PF,
  VhostUserRequest as R,
} from "../../lib/vhost_user/protocol.ts";
import { RawFrontEnd, type RawReply } from "./raw_front_end.ts";

/** Options of `fuzzFrontEnd`. */
export interface FuzzFrontEndOptions {
  readonly seed: number;
  /** stop after this long (default 5000 ms, or unbounded when `iterations` is given) */
  readonly durationMs?: number;
  /** stop after this many steps */
  readonly iterations?: number;
  /** progress and the seed (default console.log) */
  readonly log?: (s: string) => void;
  /** how soon a request must be answered (default 100 ms) */
  readonly replyDeadlineMs?: number;
  /**
   * Known defects outside the vhost-user request path, not yet fixed, that a run should
   * step around (each one reproduces when left out):
   * - "state-check-blocks": CHECK_DEVICE_STATE waits up to 5 s on the reactor for a load
   *   fd's EOF (`device_state.ts`: an eventfd never has one, a pipe whose write end the
   *   front end keeps has none yet); the fuzzer then sends no CHECK_DEVICE_STATE.
   * - "unlimited-lines": `device state:` and `vsock: ... queue broken` lines are not
   *   rate-limited; they are left out of the line-rate bound.
   */
  readonly knownDefects?: readonly KnownDefect[];
}

/** See `FuzzFrontEndOptions.knownDefects`. */
export type KnownDefect = "state-check-blocks" | "unlimited-lines";

/** The lines "unlimited-lines" leaves out of the rate bound. */
/**
 * Feature sets a real front end acks: VERSION_1, EVENT_IDX, INDIRECT_DESC, NOTIFY_ON_EMPTY
 * and the vhost-user protocol-features bit, over split rings or (bit 34, VIRTIO_F_RING_PACKED)
 * packed rings, so that every ring message is also fuzzed against packed queues.
 */
const SANE_FEATURES = [0x1_7100_0000n, 0x5_7100_0000n];

const UNLIMITED_LINES = /^.*(device state: |vsock: \w+ queue broken).*\n/gm;

/** What a finished run did. */
export interface FuzzFrontEndReport {
  readonly seed: number;
  readonly steps: number;
  readonly messages: number;
  readonly reconnects: number;
  /** connections the back end hung up on */
  readonly hangUps: number;
  /** replies later than the deadline (within the grace) */
  readonly late: number;
  readonly maxFds: number;
  readonly maxRssBytes: number;
  readonly stderrLines: number;
  readonly durationMs: number;
}

/** Shared memory the fuzzer offers: one memfd, mapped by the "VMM" at USER_BASE. */
const RAM_SIZE = 1 << 20;
const USER_BASE = 0x7f00_0000_0000;
const LATE_GRACE_MS = 2000;
const MAX_LATE = 5;
const LATE_PER = 2000;
/** fds the back end may hold above its idle count: 3 rings x 3 eventfds, a state fd, slack */
const FD_SLACK = 48;
const RSS_SLACK = 256 * 1024 * 1024;
/** stderr lines allowed per 5 s (the back end's rate limits let through ~70) */
const LINES_PER_5S = 200;
/** fds of the other ends the fuzzer keeps open per connection */
const MAX_KEPT = 32;

/** Draws on the fuzzers' seeded PRNG (`mulberry32`, tests/fuzz/prng.ts). */
export class Prng {
  readonly #next: () => number;
  constructor(seed: number) {
    this.#next = mulberry32(seed);
  }
  u32(): number {
    return this.#next() * 4294967296;
  }
  /** integer in [0, n) */
  int(n: number): number {
    return Math.floor((this.u32() / 2 ** 32) * n);
  }
  chance(p: number): boolean {
    return this.u32() / 2 ** 32 < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)];
  }
  u64(): bigint {
    return (BigInt(this.u32()) << 32n) | BigInt(this.u32());
  }
  bytes(n: number): Uint8Array {
    const b = new Uint8Array(n);
    for (let i = 0; i < n; i++) b[i] = this.u32() & 0xff;
    return b;
  }
  shuffle<T>(xs: T[]): T[] {
    for (let i = xs.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      [xs[i], xs[j]] = [xs[j], xs[i]];
    }
    return xs;
  }
}

/** One message to send: header fields, payload, fds (closed after sending unless `ram`). */
interface Msg {
  readonly request: number;
  readonly flags: number;
  readonly payload: Uint8Array;
  readonly fds: number[];
  /** bytes of header+payload actually sent (truncation); default all */
  readonly cut?: number;
  /** header size field, when it lies */
  readonly size?: number;
}

type FdKind = "ram" | "memfd" | "eventfd" | "pipe-read" | "pipe-write" | "socket";
const FD_KINDS: readonly FdKind[] = [
  "ram",
  "memfd",
  "eventfd",
  "pipe-read",
  "pipe-write",
  "socket",
];

/** A little-endian payload builder that takes any value (no codec checks: hostile on purpose). */
function layout(fields: [number, bigint | number][]): Uint8Array {
  const size = fields.reduce((n, [w]) => n + w, 0);
  const b = new Uint8Array(size);
  const v = new DataView(b.buffer);
  let off = 0;
  for (const [w, x] of fields) {
    if (w === 8) v.setBigUint64(off, BigInt.asUintN(64, BigInt(x)), true);
    else v.setUint32(off, Number(BigInt.asUintN(32, BigInt(x))), true);
    off += w;
  }
  return b;
}

class FrontEndFuzzer {
  readonly rng: Prng;
  readonly ram: number;
  fe: RawFrontEnd | null = null;
  /** fds the fuzzer keeps for the current connection (other pipe ends, kick eventfds) */
  kept: number[] = [];
  kicks: number[] = [];
  messages = 0;
  reconnects = 0;
  hangUps = 0;
  late = 0;
  readonly history: string[] = [];

  constructor(
    readonly backend: BackendProcess,
    seed: number,
    readonly deadlineMs: number,
    readonly known: ReadonlySet<KnownDefect>,
  ) {
    this.rng = new Prng(seed);
    this.ram = memfdCreate("fuzz-ram", RAM_SIZE);
    const fill = this.rng.bytes(RAM_SIZE);
    for (let off = 0; off < RAM_SIZE;) off += writeRaw(this.ram, fill.subarray(off));
  }

  note(s: string): void {
    this.history.push(s);
    if (this.history.length > 40) this.history.shift();
  }

  dispose(): void {
    this.#dropConnection();
    close(this.ram);
  }

  #dropConnection(): void {
    this.fe?.close();
    this.fe = null;
    for (const fd of this.kept) close(fd);
    this.kept = [];
    this.kicks = [];
  }

  #keep(fd: number): void {
    this.kept.push(fd);
    if (this.kept.length > MAX_KEPT) {
      const old = this.kept.shift()!;
      this.kicks = this.kicks.filter((k) => k !== old);
      close(old);
    }
  }

  // --- values -------------------------------------------------------------------------------

  index(): number {
    return this.rng.chance(0.8)
      ? this.rng.int(3)
      : this.rng.pick([3, 7, 255, 256, 0xffff, 0xffff_ffff, this.rng.u32()]);
  }

  ringNum(): number {
    return this.rng.chance(0.6)
      ? this.rng.pick([64, 128, 256])
      : this.rng.pick([0, 1, 3, 100, 1024, 32768, 65536, this.rng.u32()]);
  }

  /** A front-end virtual address: in the RAM mapping, at its edges, or anywhere. */
  userAddr(len = 16): bigint {
    const r = this.rng.int(10);
    if (r < 6) return BigInt(USER_BASE + (this.rng.int(RAM_SIZE - len) & ~15));
    if (r === 6) return BigInt(USER_BASE + RAM_SIZE - len + this.rng.int(2 * len) - len);
    if (r === 7) return BigInt(USER_BASE - 8);
    return this.rng.u64();
  }

  size(): bigint {
    return this.rng.pick([
      0n,
      1n,
      4096n,
      BigInt(RAM_SIZE),
      BigInt(RAM_SIZE + 4096),
      1n << 40n,
      (1n << 64n) - 4096n,
      this.rng.u64(),
    ]);
  }

  /** An fd of `kind`; the fuzzer's copy is closed after sending unless kept or the RAM. */
  fd(kind: FdKind = this.rng.pick(FD_KINDS)): number {
    switch (kind) {
      case "ram":
        return this.ram;
      case "memfd":
        return memfdCreate("fuzz", this.rng.pick([0, 4096, 65536]));
      case "eventfd": {
        const fd = eventFd();
        this.#keep(fd);
        this.kicks.push(fd);
        return fd;
      }
      case "pipe-read":
      case "pipe-write": {
        const [r, w] = pipe(true);
        this.#keep(kind === "pipe-read" ? w : r);
        return kind === "pipe-read" ? r : w;
      }
      case "socket": {
        const [a, b] = unixSocketPair();
        this.#keep(b);
        return a;
      }
    }
  }

  fds(n: number, kind?: FdKind): number[] {
    return Array.from({ length: n }, () => this.fd(kind));
  }

  region(overlapWith?: bigint): [number, bigint][] {
    const gpa = overlapWith ?? (this.rng.chance(0.7) ? 0n : BigInt(this.rng.int(16)) << 30n);
    const size = this.rng.chance(0.7) ? BigInt(RAM_SIZE) : this.size();
    const offset = this.rng.chance(0.8) ? 0n : this.size();
    const user = this.rng.chance(0.8) ? BigInt(USER_BASE) : this.userAddr();
    return [[8, gpa], [8, size], [8, user], [8, offset]];
  }

  // --- messages -----------------------------------------------------------------------------

  /** A known request with a structurally valid, hostile payload. */
  structured(): Msg {
    const rng = this.rng;
    const flags = VHOST_USER_VERSION | (rng.chance(0.3) ? VHOST_USER_NEED_REPLY_MASK : 0);
    const m = (request: number, payload: Uint8Array = new Uint8Array(0), fds: number[] = []) => ({
      request,
      flags,
      payload,
      fds,
    });
    const fdCount = () => (rng.chance(0.8) ? 1 : rng.pick([0, 2, 8]));
    switch (rng.int(20)) {
      case 0:
        return m(
          R.SET_FEATURES,
          layout([[8, rng.chance(0.7) ? rng.pick(SANE_FEATURES) : rng.u64()]]),
        );
      case 1: {
        const all = Object.values(PF).reduce((a, b) => a | b, 0n);
        return m(R.SET_PROTOCOL_FEATURES, layout([[8, rng.chance(0.8) ? all : rng.u64()]]));
      }
      case 2: {
        const n = rng.chance(0.9) ? 1 + rng.int(3) : rng.pick([0, 8, 9, 0xffff_ffff]);
        const shown = Math.min(n, 8);
        const regions: [number, bigint | number][] = [];
        let first: bigint | undefined;
        for (let i = 0; i < shown; i++) {
          const r = this.region(i > 0 && rng.chance(0.5) ? first : undefined);
          first ??= r[0][1] as bigint;
          regions.push(...r);
        }
        const nFds = rng.chance(0.7) ? shown : rng.int(9);
        return m(
          R.SET_MEM_TABLE,
          layout([[4, n], [4, 0], ...regions]),
          this.fds(nFds, rng.chance(0.8) ? "ram" : undefined),
        );
      }
      case 3:
        return m(
          rng.pick([R.ADD_MEM_REG, R.REM_MEM_REG]),
          layout([[8, 0], ...this.region()]),
          this.fds(fdCount(), rng.chance(0.8) ? "ram" : undefined),
        );
      case 4:
        return m(R.SET_LOG_BASE, layout([[8, this.size()], [8, this.size()]]), this.fds(fdCount()));
      case 5:
        return m(
          rng.pick([R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ENABLE, R.VRING_KICK]),
          layout([[4, this.index()], [4, this.ringNum()]]),
        );
      case 6:
        return m(R.GET_VRING_BASE, layout([[4, this.index()], [4, 0]]));
      case 7:
        return m(
          R.SET_VRING_ADDR,
          layout([
            [4, this.index()],
            [4, rng.chance(0.9) ? 0 : rng.u32()],
            [8, this.userAddr(16 * 256)],
            [8, this.userAddr(6 + 2 * 256)],
            [8, this.userAddr(6 + 8 * 256)],
            [8, rng.chance(0.9) ? 0n : rng.u64()],
          ]),
        );
      case 8: {
        const noFd = rng.chance(0.1);
        const idx = BigInt(this.index() & (rng.chance(0.9) ? 0xff : 0xffff_ffff));
        const kind: FdKind | undefined = rng.chance(0.75) ? "eventfd" : undefined;
        return m(
          rng.pick([R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR]),
          layout([[8, noFd ? idx | 0x100n : idx]]),
          noFd ? [] : this.fds(fdCount(), kind),
        );
      }
      case 9: {
        const size = rng.pick([0, 4, 8, 12, 256, 0xffff_ffff]);
        const body = Math.min(size, 256);
        return m(
          rng.pick([R.GET_CONFIG, R.SET_CONFIG]),
          (() => {
            const hdr = layout([[4, rng.pick([0, 4, 8, 250, 0xffff_ffff])], [4, size], [4, 0]]);
            const b = new Uint8Array(12 + (rng.chance(0.8) ? body : rng.int(64)));
            b.set(hdr);
            return b;
          })(),
        );
      }
      case 10:
        return m(R.SET_STATUS, layout([[8, rng.chance(0.8) ? rng.int(256) : rng.u64()]]));
      case 11: {
        const dir = rng.pick([0, 1, 1, 2]);
        const kind: FdKind = rng.pick(["pipe-read", "pipe-write", "memfd", "eventfd", "socket"]);
        return m(
          R.SET_DEVICE_STATE_FD,
          layout([[4, dir], [4, rng.chance(0.9) ? 0 : 1]]),
          this.fds(fdCount(), kind),
        );
      }
      case 12:
        return m(R.CHECK_DEVICE_STATE);
      default:
        return m(
          rng.pick([
            R.GET_FEATURES,
            R.GET_PROTOCOL_FEATURES,
            R.GET_QUEUE_NUM,
            R.GET_MAX_MEM_SLOTS,
            R.GET_STATUS,
            R.SET_OWNER,
            R.RESET_OWNER,
            R.RESET_DEVICE,
            R.SET_BACKEND_REQ_FD,
            R.SET_LOG_FD,
            R.GET_INFLIGHT_FD,
            R.POSTCOPY_ADVISE,
          ]),
          new Uint8Array(0),
          rng.chance(0.2) ? this.fds(1) : [],
        );
    }
  }

  /** A known or unknown id with a random payload of a random size, and maybe fds. */
  randomPayload(): Msg {
    const rng = this.rng;
    const request = rng.chance(0.8) ? 1 + rng.int(43) : rng.pick([0, 44, 99, rng.u32()]);
    return {
      request,
      flags: VHOST_USER_VERSION | (rng.chance(0.3) ? VHOST_USER_NEED_REPLY_MASK : 0),
      payload: rng.bytes(rng.chance(0.8) ? rng.pick([0, 4, 8, 12, 16, 20, 40]) : rng.int(4097)),
      fds: rng.chance(0.2) ? this.fds(1 + rng.int(8)) : [],
    };
  }

  /** A VMM's realize sequence (maybe shuffled) over the random RAM. */
  realize(): Msg[] {
    const flags = VHOST_USER_VERSION;
    const m = (
      request: number,
      payload: Uint8Array = new Uint8Array(0),
      fds: number[] = [],
    ): Msg => ({
      request,
      flags,
      payload,
      fds,
    });
    const setup: Msg[] = [
      m(R.SET_FEATURES, layout([[8, this.rng.pick(SANE_FEATURES)]])),
      m(R.SET_PROTOCOL_FEATURES, layout([[8, PF.REPLY_ACK | PF.CONFIG | PF.STATUS]])),
      m(R.SET_OWNER),
      m(R.SET_MEM_TABLE, layout([[4, 1], [4, 0], ...this.region(0n)]), [this.ram]),
    ];
    for (let q = 0; q < 3; q++) {
      const base = USER_BASE + q * 0x10000;
      setup.push(
        m(R.SET_VRING_NUM, layout([[4, q], [4, 256]])),
        m(
          R.SET_VRING_ADDR,
          layout([[4, q], [4, 0], [8, base], [8, base + 0x1000], [8, base + 0x2000], [8, 0]]),
        ),
        m(R.SET_VRING_BASE, layout([[4, q], [4, this.rng.int(65536)]])),
        m(R.SET_VRING_CALL, layout([[8, q]]), [this.fd("eventfd")]),
        m(R.SET_VRING_KICK, layout([[8, q]]), [this.fd("eventfd")]),
        m(R.SET_VRING_ENABLE, layout([[4, q], [4, 1]])),
      );
    }
    setup.push(m(R.SET_STATUS, layout([[8, 15]])));
    return this.rng.chance(0.5) ? setup : this.rng.shuffle(setup);
  }

  // --- one step -----------------------------------------------------------------------------

  async step(n: number): Promise<void> {
    const rng = this.rng;
    if (this.fe === null) this.fe = new RawFrontEnd(this.backend.socketPath);
    const r = rng.int(100);
    if (r < 4) {
      this.note(`${n}: reconnect`);
      return await this.#reconnect();
    }
    if (r < 12 && this.kicks.length > 0) {
      this.note(`${n}: kicks`);
      for (let i = 0; i < 1 + rng.int(4); i++) eventFdWrite(rng.pick(this.kicks));
      return await this.#probe([]);
    }
    if (r < 15) return await this.#truncated(n);
    if (r < 17) return await this.#framingError(n);
    let msgs: Msg[];
    if (r < 22) msgs = this.realize();
    else if (r < 40) msgs = [this.randomPayload()];
    else msgs = [this.structured()];
    if (this.known.has("state-check-blocks")) {
      msgs = msgs.filter((m) => m.request !== R.CHECK_DEVICE_STATE);
    }
    this.note(`${n}: ${msgs.map(describe).join(", ")}`);
    const sent: Msg[] = [];
    for (const msg of msgs) {
      const bytes = encodeMessage(msg.request, msg.flags, msg.payload);
      const outcome = this.fe!.send(bytes, msg.fds, 1000);
      this.#closeSent(msg);
      this.messages++;
      if (outcome === "closed") return await this.#hungUp();
      if (outcome === "full") throw new Error("the back end stopped reading its socket");
      sent.push(msg);
    }
    await this.#probe(sent);
  }

  #closeSent(msg: Msg): void {
    for (const fd of msg.fds) {
      if (fd !== this.ram && !this.kept.includes(fd)) close(fd);
    }
  }

  async #truncated(n: number): Promise<void> {
    const msg = this.structured();
    const bytes = encodeMessage(msg.request, msg.flags, msg.payload);
    const cut = this.rng.int(bytes.length);
    this.note(`${n}: ${describe(msg)} cut to ${cut} bytes, then hang up`);
    this.fe!.send(bytes.subarray(0, cut), msg.fds);
    this.#closeSent(msg);
    await this.#reconnect();
  }

  async #framingError(n: number): Promise<void> {
    const rng = this.rng;
    const b = layout([[4, R.GET_FEATURES], [4, rng.pick([0, 2, 3, 0x101, 0x80000001])], [4, 0]]);
    if (rng.chance(0.5)) new DataView(b.buffer).setUint32(4, 1, true);
    if (rng.chance(0.5)) new DataView(b.buffer).setUint32(8, 4097 + rng.int(1 << 20), true);
    this.note(`${n}: framing error ${[...b].map((x) => x.toString(16)).join(" ")}`);
    const outcome = this.fe!.send(b);
    if (outcome === "closed") return await this.#hungUp();
    const got = this.fe!.readUntil(R.GET_FEATURES, this.deadlineMs + LATE_GRACE_MS);
    // A bad header may still decode as a valid one (flags 1, size 0): then it is answered.
    if (got.outcome === "timeout" || got.outcome === "malformed") {
      throw new Error(`framing error: ${got.outcome} (${this.fe!.malformed})`);
    }
    if (got.outcome === "closed") return await this.#hungUp();
  }

  /** The back end closed the fuzzing connection: a fresh front end must be served. */
  async #hungUp(): Promise<void> {
    this.hangUps++;
    await this.#reconnect();
  }

  async #reconnect(): Promise<void> {
    this.#dropConnection();
    this.reconnects++;
    const fe = new RawFrontEnd(this.backend.socketPath);
    this.fe = fe;
    const t0 = performance.now();
    fe.send(encodeMessage(R.GET_FEATURES, VHOST_USER_VERSION));
    const got = fe.readUntil(R.GET_FEATURES, this.deadlineMs + LATE_GRACE_MS);
    this.#timed("a fresh front end's GET_FEATURES", performance.now() - t0, got.outcome);
    if (got.outcome !== "reply" || got.replies.length !== 1) {
      throw new Error(
        `a fresh front end's GET_FEATURES: ${got.outcome} (${got.replies.length} replies)`,
      );
    }
    await Promise.resolve();
  }

  #timed(what: string, ms: number, outcome: string): void {
    if (outcome === "timeout") {
      throw new Error(
        `${what}: no reply and no hang-up within ${this.deadlineMs + LATE_GRACE_MS} ms`,
      );
    }
    if (ms > this.deadlineMs) {
      this.late++;
      this.note(`   late: ${what} took ${ms.toFixed(0)} ms`);
      if (this.late > MAX_LATE + this.messages / LATE_PER) {
        throw new Error(`${what}: ${this.late} replies later than ${this.deadlineMs} ms`);
      }
    }
  }

  /**
   * After `sent`: a GET_FEATURES on the same socket is answered in time, after exactly
   * the replies `sent` calls for, or the connection is closed.
   */
  async #probe(sent: Msg[]): Promise<void> {
    const fe = this.fe!;
    const t0 = performance.now();
    const outcome = fe.send(encodeMessage(R.GET_FEATURES, VHOST_USER_VERSION));
    if (outcome === "closed") return await this.#hungUp();
    const replies: RawReply[] = [];
    let want = 1 + sent.filter((m) => m.request === R.GET_FEATURES).length;
    while (want > 0) {
      const left = this.deadlineMs + LATE_GRACE_MS - (performance.now() - t0);
      const got = fe.readUntil(R.GET_FEATURES, Math.max(0, left));
      replies.push(...got.replies);
      if (got.outcome === "closed") return await this.#hungUp();
      if (got.outcome === "malformed") throw new Error(`malformed reply: ${fe.malformed}`);
      this.#timed(
        `GET_FEATURES after ${sent.map(describe).join(", ") || "kicks"}`,
        performance.now() - t0,
        got.outcome,
      );
      want--;
    }
    checkReplies(sent, replies);
  }
}

/** Replies must come in request order: one per always-replied request, none unasked. */
function checkReplies(sent: Msg[], replies: RawReply[]): void {
  let i = 0;
  for (const msg of sent) {
    const next = replies[i];
    if (ALWAYS_REPLIED_REQUESTS.has(msg.request)) {
      if (next === undefined || next.request !== msg.request) {
        throw new Error(
          `${describe(msg)}: no reply (next reply: ${next ? requestName(next.request) : "none"})`,
        );
      }
      i++;
    } else if (next !== undefined && next.request === msg.request) {
      const mayReply = (msg.flags & VHOST_USER_NEED_REPLY_MASK) !== 0 ||
        msg.request === R.SET_LOG_BASE;
      if (!mayReply) throw new Error(`${describe(msg)}: a reply nobody asked for`);
      i++;
    }
  }
  const rest = replies.slice(i);
  if (rest.length !== 1 || rest[0].request !== R.GET_FEATURES) {
    throw new Error(
      `stray replies before the probe's: ${rest.map((r) => requestName(r.request)).join(", ")}`,
    );
  }
}

function describe(m: Msg): string {
  const nr = (m.flags & VHOST_USER_NEED_REPLY_MASK) !== 0 ? "+NEED_REPLY" : "";
  return `${requestName(m.request)}${nr}(${m.payload.length} B, ${m.fds.length} fds)`;
}

/** Open fds of process `pid`. */
function fdCount(pid: number): number {
  let n = 0;
  for (const _ of Deno.readDirSync(`/proc/${pid}/fd`)) n++;
  return n;
}

/** The most frequent kinds of log line (numbers elided), with their counts. */
function lineKinds(stderr: string): string {
  const kinds = new Map<string, number>();
  for (const line of stderr.split("\n")) {
    const kind = line.slice(25, 120).replace(/[0-9a-fx]*[0-9][0-9a-fx]*/g, "#");
    if (kind) kinds.set(kind, (kinds.get(kind) ?? 0) + 1);
  }
  return [...kinds].sort((a, b) => b[1] - a[1]).slice(0, 12).map(([k, n]) => `${n} x ${k}`)
    .join("\n");
}

function countLines(s: string): number {
  let n = 0;
  for (let i = s.indexOf("\n"); i >= 0; i = s.indexOf("\n", i + 1)) n++;
  return n;
}

/** Runs the fuzzer (see the module doc); throws on the first broken invariant. */
export async function fuzzFrontEnd(opts: FuzzFrontEndOptions): Promise<FuzzFrontEndReport> {
  const say = opts.log ?? ((s: string) => console.log(s));
  const seed = opts.seed >>> 0;
  say(`front-end fuzz: seed ${seed} (replay with FUZZ_SEED=${seed})`);
  const durationMs = opts.durationMs ?? (opts.iterations !== undefined ? Infinity : 5000);
  const iterations = opts.iterations ?? Infinity;
  const backend = await spawnBackend({ logLevel: "info" });
  const known = new Set(opts.knownDefects ?? []);
  const fuzzer = new FrontEndFuzzer(backend, seed, opts.replyDeadlineMs ?? 100, known);
  const t0 = performance.now();
  let steps = 0;
  let maxFds = 0;
  let maxRss = 0;
  try {
    // The idle baseline, with a front end attached.
    await fuzzer.step(-1).catch(() => {});
    const fdBase = fdCount(backend.pid);
    const rssBase = rssBytes(backend.pid);
    while (steps < iterations && performance.now() - t0 < durationMs) {
      await fuzzer.step(steps);
      steps++;
      // Let the child's stderr drain run (the socket calls block this thread).
      await new Promise((r) => setTimeout(r, 0));
      if (!backend.running) throw new Error("the back end exited");
      const fds = fdCount(backend.pid);
      const rss = rssBytes(backend.pid);
      maxFds = Math.max(maxFds, fds);
      maxRss = Math.max(maxRss, rss);
      if (fds > fdBase + FD_SLACK) throw new Error(`fd count ${fds} (idle: ${fdBase})`);
      if (rss > rssBase + RSS_SLACK) {
        throw new Error(`RSS ${rss >> 20} MiB (idle ${rssBase >> 20})`);
      }
      const err = /^.* ERROR .*(threw|uncaught).*$/m.exec(backend.stderr());
      if (err !== null) throw new Error(`an exception escaped a handler: ${err[0]}`);
      const text = backend.stderr();
      const lines = countLines(
        known.has("unlimited-lines") ? text.replace(UNLIMITED_LINES, "") : text,
      );
      const allowed = LINES_PER_5S * Math.ceil((performance.now() - t0 + 1) / 5000);
      if (lines > allowed) {
        throw new Error(
          `${lines} stderr lines in ${((performance.now() - t0) / 1000).toFixed(1)} s`,
        );
      }
    }
  } catch (e) {
    await new Promise((r) => setTimeout(r, 100));
    const tail = backend.stderr().split("\n").slice(-30).join("\n");
    throw new Error(
      `front-end fuzz failed (seed ${seed}, step ${steps}): ${
        e instanceof Error ? e.message : e
      }\nlast steps:\n${fuzzer.history.join("\n")}\nback end stderr by kind:\n${
        lineKinds(backend.stderr())
      }\nback end stderr (tail):\n${tail}`,
      { cause: e },
    );
  } finally {
    fuzzer.dispose();
    await backend.stop();
  }
  const report: FuzzFrontEndReport = {
    seed,
    steps,
    messages: fuzzer.messages,
    reconnects: fuzzer.reconnects,
    hangUps: fuzzer.hangUps,
    late: fuzzer.late,
    maxFds,
    maxRssBytes: maxRss,
    stderrLines: countLines(backend.stderr()),
    durationMs: performance.now() - t0,
  };
  say(`front-end fuzz: ${JSON.stringify(report)}`);
  return report;
}
