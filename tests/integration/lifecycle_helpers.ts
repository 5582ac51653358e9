/**
 * Helpers shared by the ring life-cycle integration tests (kick after start, enable notification
 * then re-check, never drop a kick, suspend/resume, reconnect and driver reset): the latency
 * bound work released by a ring start or enable must meet, the VMMs and ring layouts the tests
 * run over, a back end with front ends that is always torn down, connections both ways that keep
 * their listeners, and small test utilities.
 */
import assert from "node:assert/strict";
import {
  type BackendProcess,
  spawnBackend,
  VhostUserFrontEnd,
  type VmHandle,
} from "../../lib/testing/mod.ts";
import { GUEST_CID, waitUntil } from "./raw_guest.ts";

/**
 * The stall that kick after start prevents: Linux's VSOCK_DEFAULT_CONNECT_TIMEOUT. Everything
 * here must beat it.
 */
const KICK_AFTER_START_STALL_MS = 2000;
/**
 * How soon work released by a ring start or enable must reach the guest. It takes 5-10 ms
 * here; the bound is generous because the test machine is shared (hundreds of ms have been
 * seen under load), yet half of that stall. A back end that waits for a kick or a
 * timeout never delivers at all: nothing else happens in these tests.
 */
export const START_LATENCY_MS = KICK_AFTER_START_STALL_MS / 2;
/** The VMMs and ring layouts (split; packed: VIRTIO_F_RING_PACKED) the tests run over. */
export const VM_SETUPS = [
  { profile: "qemu", packed: false },
  { profile: "crosvm", packed: false },
  { profile: "qemu", packed: true },
  { profile: "crosvm", packed: true },
] as const;

/** Marks a promise awaited later as handled, so a test failing first does not also crash. */
export function later<T>(p: Promise<T>): Promise<T> {
  p.catch(() => {});
  return p;
}

/** Waits until the back end logged a line containing `text` (its log is our event trace). */
export function waitForLog(
  backend: BackendProcess,
  text: string,
  timeoutMs = 5000,
): Promise<number> {
  return waitUntil(() => backend.stderr().includes(text), timeoutMs, `back-end log "${text}"`);
}

/** Spawns a back end and connects a front end; `fn` gets both; everything is torn down. */
export async function withBackend(
  frontEndOpts: Parameters<typeof VhostUserFrontEnd.connect>[1],
  fn: (backend: BackendProcess, connectFrontEnd: () => Promise<VhostUserFrontEnd>) => Promise<void>,
  backendOpts: { logLevel?: string } = {},
): Promise<void> {
  const backend = await spawnBackend({ cid: GUEST_CID, ...backendOpts });
  const fes: VhostUserFrontEnd[] = [];
  try {
    await fn(backend, async () => {
      const fe = await VhostUserFrontEnd.connect(backend.socketPath, frontEndOpts);
      fes.push(fe);
      return fe;
    });
  } catch (e) {
    for (const fe of fes) fe.close();
    const exit = await backend.stop();
    throw new Error(`${e instanceof Error ? e.stack : e}\n--- back end stderr ---\n${exit.stderr}`);
  }
  for (const fe of fes) fe.close();
  const exit = await backend.stop();
  assert.doesNotMatch(exit.stderr, / ERROR /, "the back end logged no error");
}

/** A guest listener on `port` and a host app connected to it. */
export async function hostToGuest(vm: VmHandle, port: number) {
  const listener = vm.guest.listen(port);
  const [host, conn] = await Promise.all([vm.hostConnect(port), listener.accept()]);
  return { listener, host, conn };
}

/** A host listener on `port` and a guest connection to it. */
export async function guestToHost(vm: VmHandle, port: number) {
  const hl = vm.hostListen(port);
  const [conn, host] = await Promise.all([vm.guest.connect(port), hl.accept()]);
  return { hl, host, conn };
}

/** A test-name suffix for packed rings (split is the default). */
export function rings(packed: boolean): string {
  return packed ? ", packed rings" : "";
}

/** How many times `needle` occurs in `haystack`. */
export function countOf(haystack: string, needle: string): number {
  return haystack.split(needle).length - 1;
}
