/**
 * Device state transfer as a front end drives it (vhost-user protocol feature DEVICE_STATE,
 * `docs/interop/vhost-user.rst` "Migrating back-end state"): SET_DEVICE_STATE_FD hands the
 * back end one end of a pipe, the state flows through it until EOF, and CHECK_DEVICE_STATE
 * reports whether the transfer (and, on load, the load) succeeded.
 *
 * The pipe is read and written without blocking, awaiting readiness, so other async work
 * (the back end in the same process, timers) keeps running.
 */

import {
  close,
  EAGAIN,
  pipe,
  pollFdsAsync,
  POLLIN,
  POLLOUT,
  readRaw,
  setNonBlocking,
  SysError,
  writeRaw,
} from "../../ffi/mod.ts";
import {
  VHOST_TRANSFER_STATE_DIRECTION_LOAD,
  VHOST_TRANSFER_STATE_DIRECTION_SAVE,
} from "../vhost_user/protocol.ts";
import { concat } from "./bytes.ts";
import { VhostUserError } from "./vhost_user_channel.ts";
import type { VhostUserClient } from "./vhost_user_client.ts";

/**
 * Saves the back end's device state (rings must be stopped): a pipe's write end goes out
 * with SET_DEVICE_STATE_FD(SAVE), the state is read to EOF, then CHECK_DEVICE_STATE must
 * report 0.
 */
export async function saveDeviceState(
  c: VhostUserClient,
  timeoutMs: number,
): Promise<Uint8Array> {
  const fds = pipe(false);
  let readFd = fds[0];
  let writeFd = fds[1];
  try {
    setNonBlocking(readFd);
    const res = c.setDeviceStateFd(VHOST_TRANSFER_STATE_DIRECTION_SAVE, writeFd);
    close(writeFd); // EOF must come from the back end's copy alone
    writeFd = -1;
    if (res.error !== 0) {
      throw new VhostUserError(`SET_DEVICE_STATE_FD(save) failed: error ${res.error}`);
    }
    if (res.backendFd !== null) {
      close(readFd);
      readFd = res.backendFd;
      setNonBlocking(readFd);
    }
    const data = await readToEof(readFd, timeoutMs, "device state (save)");
    const check = c.checkDeviceState();
    if (check !== 0n) throw new VhostUserError(`CHECK_DEVICE_STATE after save: ${check}`);
    return data;
  } finally {
    close(readFd);
    close(writeFd);
  }
}

/**
 * Loads device state into the back end: a pipe's read end goes out with
 * SET_DEVICE_STATE_FD(LOAD), `state` is written and the pipe closed (EOF ends the
 * transfer), then CHECK_DEVICE_STATE must report 0.
 */
export async function loadDeviceState(
  c: VhostUserClient,
  state: Uint8Array,
  timeoutMs: number,
): Promise<void> {
  const fds = pipe(false);
  let readFd = fds[0];
  let writeFd = fds[1];
  try {
    setNonBlocking(writeFd);
    const res = c.setDeviceStateFd(VHOST_TRANSFER_STATE_DIRECTION_LOAD, readFd);
    close(readFd);
    readFd = -1;
    if (res.error !== 0) {
      throw new VhostUserError(`SET_DEVICE_STATE_FD(load) failed: error ${res.error}`);
    }
    if (res.backendFd !== null) {
      close(writeFd);
      writeFd = res.backendFd;
      setNonBlocking(writeFd);
    }
    await writeAllFd(writeFd, state, timeoutMs, "device state (load)");
    close(writeFd); // EOF ends the transfer
    writeFd = -1;
    const check = c.checkDeviceState();
    if (check !== 0n) throw new VhostUserError(`CHECK_DEVICE_STATE after load: ${check}`);
  } finally {
    close(readFd);
    close(writeFd);
  }
}

async function readToEof(fd: number, timeoutMs: number, what: string): Promise<Uint8Array> {
  const deadline = Date.now() + timeoutMs;
  const chunks: Uint8Array[] = [];
  const buf = new Uint8Array(65536);
  for (;;) {
    const n = readRaw(fd, buf);
    if (n > 0) {
      chunks.push(buf.slice(0, n));
      continue;
    }
    if (n === 0) break;
    if (n !== -EAGAIN) throw new SysError("read", -n, what);
    const left = deadline - Date.now();
    if (left <= 0) throw new VhostUserError(`${what}: no EOF within ${timeoutMs} ms`);
    await pollFdsAsync([fd], [POLLIN], Math.min(left, 100));
  }
  return concat(chunks);
}

async function writeAllFd(
  fd: number,
  data: Uint8Array,
  timeoutMs: number,
  what: string,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let off = 0;
  while (off < data.length) {
    const n = writeRaw(fd, data.subarray(off), data.length - off);
    if (n >= 0) {
      off += n;
      continue;
    }
    if (n !== -EAGAIN) throw new SysError("write", -n, what);
    const left = deadline - Date.now();
    if (left <= 0) throw new VhostUserError(`${what}: could not write within ${timeoutMs} ms`);
    await pollFdsAsync([fd], [POLLOUT], Math.min(left, 100));
  }
}
