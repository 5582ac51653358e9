/**
 * Helpers shared by the snapshot/restore and dirty-log integration tests (DEVICE_STATE
 * save/load, held traffic after a load, refused states, LOG_SHMFD): waiting for a back end's
 * log line, bytes both ways over an established pair, a pair of connections opened (and closed)
 * both ways, failures that quote the back ends' stderr, and crosvm's restore without its final
 * kicks.
 */
import assert from "node:assert/strict";
import {
  type BackendProcess,
  type GuestConn,
  type GuestSnapshot,
  hostConnect,
  hostListen,
  pattern,
  readExactly,
  type VhostUserFrontEnd,
  type VsockGuest,
  writeAll,
} from "../../lib/testing/mod.ts";

/** Waits (polling its stderr every 20 ms, bounded) until the back end has logged `re`. */
export async function waitForLog(
  b: BackendProcess,
  re: RegExp,
  timeoutMs = 5000,
  from = 0,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!re.test(b.stderr().slice(from))) {
    if (Date.now() >= deadline) {
      throw new Error(`the back end did not log ${re} within ${timeoutMs} ms:\n${b.stderr()}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Host -> guest and guest -> host bytes over one established pair. */
export async function exchange(host: Deno.Conn, guest: GuestConn, n: number, seed: number) {
  const a = pattern(n, seed);
  const [, got] = await Promise.all([writeAll(host, a), guest.readExactly(n)]);
  assert.deepEqual(got, a, "host -> guest bytes");
  const b = pattern(n, seed + 1);
  const [, back] = await Promise.all([guest.write(b), readExactly(host, n)]);
  assert.deepEqual(back, b, "guest -> host bytes");
}

/** Opens one host->guest connection (via `udsPath`) and one guest->host connection. */
export async function openBothWays(
  guest: VsockGuest,
  udsPath: string,
  guestPort: number,
  hostPort: number,
  listener = guest.listen(guestPort),
) {
  const [h2g, g1] = await Promise.all([hostConnect(udsPath, guestPort), listener.accept()]);
  const hl = hostListen(udsPath, hostPort);
  const [g2, g2h] = await Promise.all([guest.connect(hostPort), hl.accept()]);
  hl.close();
  return { listener, h2g, g1, g2, g2h };
}

/** Closes both connections of an `openBothWays` pair: the host ends, then the guest ends. */
export async function closeBothWays(c: Awaited<ReturnType<typeof openBothWays>>): Promise<void> {
  c.h2g.conn.close();
  c.g2h.close();
  await c.g1.close();
  await c.g2.close();
}

/** Runs `fn`; on failure appends the stderr of the back ends `backends()` lists then. */
export async function withStderr(
  backends: () => (BackendProcess | null)[],
  fn: () => Promise<void>,
): Promise<void> {
  try {
    await fn();
  } catch (e) {
    const logs = backends()
      .map((b, i) => b === null ? "" : `--- back end ${i + 1} stderr ---\n${b.stderr()}`)
      .join("\n");
    throw new Error(`${e instanceof Error ? e.stack : e}\n${logs}`, { cause: e });
  }
}

/**
 * crosvm's restore without its final kicks: SET_FEATURES, load the state, then start the
 * rings at the saved bases (`VsockGuest.attach` starts them at each used index, which equals
 * the saved base after a clean stop; asserted). No queue is kicked by the front end.
 */
export async function restoreWithoutKicks(
  guest: VsockGuest,
  fe: VhostUserFrontEnd,
  snap: GuestSnapshot,
) {
  for (let i = 0; i < 3; i++) {
    assert.equal(guest.queue(i).readUsedIdx(), snap.bases[i], `queue ${i}: used idx = saved base`);
  }
  fe.setFeatures(fe.backendFeaturesFor(snap.features));
  await fe.loadDeviceState(snap.deviceState);
  guest.attach(fe);
}
