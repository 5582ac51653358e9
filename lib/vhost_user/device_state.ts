/**
 * Device state transfer (vhost-user protocol feature DEVICE_STATE).
 *
 * SET_DEVICE_STATE_FD carries `{u32 direction (0 save, 1 load), u32 phase
 * (0 = stopped)}` and a pipe-like fd. On save the back end writes its state to
 * the fd and closes it (EOF ends the transfer); on load it reads the fd to EOF
 * and then loads what it read. The reply is a u64: bits 0-7 an error code
 * (0 = ok), bit 8 set = "the back end returns no fd of its own" (we always use
 * the front end's fd). CHECK_DEVICE_STATE then reports whether the transfer
 * and the load succeeded (u64 0 = success).
 *
 * Transfers run on the reactor with a non-blocking fd, so a stalled peer never
 * blocks the device. CHECK_DEVICE_STATE on a load whose EOF has not been seen yet
 * is answered when the EOF comes (the front end has normally closed its end by
 * then), or fails after DEVICE_STATE_EOF_WAIT_MS; meanwhile the reactor serves
 * everything else (the back end reads no further message from that front end
 * until the answer is sent). Every line a front end can trigger is rate-limited.
 */
import {
  close,
  EAGAIN,
  EPOLLIN,
  EPOLLOUT,
  readRaw,
  setNonBlocking,
  writeRaw,
} from "../../ffi/mod.ts";
import { log, LogLimiter } from "../log.ts";
import type { Reactor, Timer } from "../reactor.ts";
import type { VirtioDevice } from "./device.ts";
import {
  VHOST_TRANSFER_STATE_DIRECTION_LOAD,
  VHOST_TRANSFER_STATE_DIRECTION_SAVE,
  VHOST_TRANSFER_STATE_PHASE_STOPPED,
  VHOST_USER_DEVICE_STATE_NOFD_MASK,
} from "./protocol.ts";

/** Largest device state we accept on load (ours is a few hundred bytes). */
export const MAX_DEVICE_STATE_BYTES = 1 << 20;
/** How long CHECK_DEVICE_STATE waits for a load's EOF (the front end closes its end before asking). */
export const DEVICE_STATE_EOF_WAIT_MS = 1000;

const ERR_GENERIC = 1;

type Transfer =
  | { kind: "save"; fd: number; data: Uint8Array; off: number }
  | { kind: "load"; fd: number; chunks: Uint8Array[]; total: number };

/** Lines about transfers a front end starts (and may repeat at will). */
const stateLog = new LogLimiter("device state", 20, 5000);

export class DeviceStateChannel {
  #transfer: Transfer | null = null;
  /** outcome of the last finished transfer: null = none yet, "" = ok, else the error */
  #result: string | null = null;
  /** a CHECK_DEVICE_STATE waiting for the load's EOF, and its deadline */
  #checkWaiter: ((result: number) => void) | null = null;
  #checkTimer: Timer | null = null;

  constructor(readonly reactor: Reactor, readonly device: VirtioDevice) {}

  /** Handles SET_DEVICE_STATE_FD; owns `fd` from now on. Returns the u64 reply. */
  begin(direction: number, phase: number, fd: number, stopped: boolean): number {
    this.#abort("superseded by a new transfer");
    this.#result = null;
    const fail = (why: string) => {
      close(fd);
      this.#result = why;
      if (stateLog.allow()) log.warn(`device state: ${why}`);
      return ERR_GENERIC | VHOST_USER_DEVICE_STATE_NOFD_MASK;
    };
    if (phase !== VHOST_TRANSFER_STATE_PHASE_STOPPED) return fail(`unsupported phase ${phase}`);
    if (!stopped) return fail("state transfer requested while rings are running");
    setNonBlocking(fd, true);
    if (direction === VHOST_TRANSFER_STATE_DIRECTION_SAVE) {
      if (this.device.saveState === undefined) return fail("device cannot save state");
      const data = this.device.saveState();
      this.#transfer = { kind: "save", fd, data, off: 0 };
      this.reactor.addFd(fd, EPOLLOUT, () => this.#pump());
      if (stateLog.allow()) log.info(`device state: saving ${data.length} bytes`);
    } else if (direction === VHOST_TRANSFER_STATE_DIRECTION_LOAD) {
      if (this.device.loadState === undefined) return fail("device cannot load state");
      this.#transfer = { kind: "load", fd, chunks: [], total: 0 };
      this.reactor.addFd(fd, EPOLLIN, () => this.#pump());
      if (stateLog.allow()) log.info("device state: loading");
    } else {
      return fail(`unknown transfer direction ${direction}`);
    }
    this.#pump();
    return VHOST_USER_DEVICE_STATE_NOFD_MASK;
  }

  /**
   * Handles CHECK_DEVICE_STATE: `done(0)` if the last transfer (and load) succeeded, else
   * `done(1)`. Called at once, or (a load still waiting for its EOF) when the EOF comes or
   * DEVICE_STATE_EOF_WAIT_MS has passed; the reactor is never blocked.
   */
  check(done: (result: number) => void): void {
    const t = this.#transfer;
    if (t !== null && t.kind === "load") {
      this.#checkWaiter?.(ERR_GENERIC);
      this.#checkWaiter = done;
      this.#checkTimer = this.reactor.setTimer(DEVICE_STATE_EOF_WAIT_MS, () => {
        this.#checkTimer = null;
        this.#abort("no EOF on the state fd");
      });
      this.#pump();
      return;
    }
    if (t !== null && t.kind === "save") {
      this.#abort(`front end checked before reading the whole state (${t.off}/${t.data.length})`);
    }
    done(this.#outcome());
  }

  #outcome(): number {
    if (this.#result === null) {
      if (stateLog.allow()) log.warn("device state: CHECK_DEVICE_STATE without a transfer");
      return ERR_GENERIC;
    }
    return this.#result === "" ? 0 : ERR_GENERIC;
  }

  #pump(): void {
    const t = this.#transfer;
    if (t === null) return;
    if (t.kind === "save") {
      while (t.off < t.data.length) {
        const n = writeRaw(t.fd, t.data.subarray(t.off), t.data.length - t.off);
        if (n === -EAGAIN) return;
        if (n < 0) return this.#abort(`write to the state fd failed (errno ${-n})`);
        t.off += n;
      }
      this.#finish("");
      if (stateLog.allow()) log.info(`device state: saved ${t.data.length} bytes`);
      return;
    }
    const buf = new Uint8Array(64 * 1024);
    for (;;) {
      const n = readRaw(t.fd, buf);
      if (n === -EAGAIN) return;
      if (n < 0) return this.#abort(`read from the state fd failed (errno ${-n})`);
      if (n === 0) break;
      t.total += n;
      if (t.total > MAX_DEVICE_STATE_BYTES) {
        return this.#abort(`state larger than ${MAX_DEVICE_STATE_BYTES} bytes`);
      }
      t.chunks.push(buf.slice(0, n));
    }
    const data = new Uint8Array(t.total);
    let off = 0;
    for (const c of t.chunks) {
      data.set(c, off);
      off += c.length;
    }
    try {
      this.device.loadState!(data);
      this.#finish("");
      if (stateLog.allow()) log.info(`device state: loaded ${data.length} bytes`);
    } catch (e) {
      this.#finish(e instanceof Error ? e.message : String(e));
      if (stateLog.allow()) log.warn(`device state: load failed: ${this.#result}`);
    }
  }

  #finish(result: string): void {
    const t = this.#transfer;
    if (t !== null) {
      this.reactor.removeFd(t.fd);
      close(t.fd);
    }
    this.#transfer = null;
    this.#result = result;
    this.#checkTimer?.cancel();
    this.#checkTimer = null;
    const waiter = this.#checkWaiter;
    this.#checkWaiter = null;
    waiter?.(this.#outcome());
  }

  #abort(why: string): void {
    if (this.#transfer === null) return;
    if (stateLog.allow()) log.warn(`device state: ${why}`);
    this.#finish(why);
  }

  /** Front end gone: drop any transfer. */
  reset(): void {
    this.#abort("front end disconnected");
    this.#result = null;
  }

  dispose(): void {
    this.reset();
  }
}
