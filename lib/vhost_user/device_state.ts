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
 * blocks the device. CHECK_DEVICE_STATE completes a load whose EOF has not been
 * seen yet by waiting (bounded) for it: the front end has closed its end by then.
 */
import {
  close,
  EAGAIN,
  EPOLLIN,
  EPOLLOUT,
  pollFds,
  POLLIN,
  readRaw,
  setNonBlocking,
  writeRaw,
} from "../../ffi/mod.ts";
import { log } from "../log.ts";
import type { Reactor } from "../reactor.ts";
import type { VirtioDevice } from "./device.ts";
import {
  VHOST_TRANSFER_STATE_DIRECTION_LOAD,
  VHOST_TRANSFER_STATE_DIRECTION_SAVE,
  VHOST_TRANSFER_STATE_PHASE_STOPPED,
  VHOST_USER_DEVICE_STATE_NOFD_MASK,
} from "./protocol.ts";

/** Largest device state we accept on load (ours is a few hundred bytes). */
export const MAX_DEVICE_STATE_BYTES = 1 << 20;
/** How long CHECK_DEVICE_STATE waits for a load's EOF. */
export const DEVICE_STATE_EOF_WAIT_MS = 5000;

const ERR_GENERIC = 1;

type Transfer =
  | { kind: "save"; fd: number; data: Uint8Array; off: number }
  | { kind: "load"; fd: number; chunks: Uint8Array[]; total: number };

export class DeviceStateChannel {
  #transfer: Transfer | null = null;
  /** outcome of the last finished transfer: null = none yet, "" = ok, else the error */
  #result: string | null = null;

  constructor(readonly reactor: Reactor, readonly device: VirtioDevice) {}

  /** Handles SET_DEVICE_STATE_FD; owns `fd` from now on. Returns the u64 reply. */
  begin(direction: number, phase: number, fd: number, stopped: boolean): number {
    this.#abort("superseded by a new transfer");
    this.#result = null;
    const fail = (why: string) => {
      close(fd);
      this.#result = why;
      log.warn(`device state: ${why}`);
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
      log.info(`device state: saving ${data.length} bytes`);
    } else if (direction === VHOST_TRANSFER_STATE_DIRECTION_LOAD) {
      if (this.device.loadState === undefined) return fail("device cannot load state");
      this.#transfer = { kind: "load", fd, chunks: [], total: 0 };
      this.reactor.addFd(fd, EPOLLIN, () => this.#pump());
      log.info("device state: loading");
    } else {
      return fail(`unknown transfer direction ${direction}`);
    }
    this.#pump();
    return VHOST_USER_DEVICE_STATE_NOFD_MASK;
  }

  /** Handles CHECK_DEVICE_STATE: 0 if the last transfer (and load) succeeded. */
  check(): number {
    const t = this.#transfer;
    if (t !== null && t.kind === "load") {
      // The front end has closed its end before asking; wait (bounded) for the EOF.
      const deadline = performance.now() + DEVICE_STATE_EOF_WAIT_MS;
      while (this.#transfer === t && performance.now() < deadline) {
        pollFds([t.fd], [POLLIN], Math.max(1, Math.ceil(deadline - performance.now())));
        this.#pump();
      }
      if (this.#transfer === t) this.#abort("no EOF on the state fd");
    } else if (t !== null && t.kind === "save") {
      this.#abort(`front end checked before reading the whole state (${t.off}/${t.data.length})`);
    }
    if (this.#result === null) {
      log.warn("device state: CHECK_DEVICE_STATE without a transfer");
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
      log.info(`device state: saved ${t.data.length} bytes`);
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
      log.info(`device state: loaded ${data.length} bytes`);
    } catch (e) {
      this.#finish(e instanceof Error ? e.message : String(e));
      log.warn(`device state: load failed: ${this.#result}`);
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
  }

  #abort(why: string): void {
    if (this.#transfer === null) return;
    log.warn(`device state: ${why}`);
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
