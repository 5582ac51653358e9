/**
 * A guest that closes while the host app is still reading slowly must not lose
 * the bytes the back end still holds for that app: the connection drains, then
 * the host app reads EOF and the guest gets its RST (found by the QEMU test with
 * 16 streams and slow readers; this reproduces it without QEMU).
 */
import assert from "node:assert/strict";
import { concat, pattern, startVm } from "../../lib/testing/mod.ts";

Deno.test("guest close with bytes still queued for a slow host app: nothing is lost", async () => {
  const vm = await startVm({ profile: "qemu" });
  try {
    const listener = vm.hostListen(6100);
    const connecting = vm.guest.connect(6100);
    const host = await listener.accept({ timeoutMs: 5000 });
    const conn = await connecting;
    const data = pattern(1 << 20, 3);
    // The host app reads 4 KiB every 5 ms: the back end's queue toward it fills up.
    const received: Uint8Array[] = [];
    let total = 0;
    const reader = (async () => {
      const buf = new Uint8Array(4096);
      for (;;) {
        const n = await host.read(buf);
        if (n === null) return;
        received.push(buf.slice(0, n));
        total += n;
        await new Promise((r) => setTimeout(r, 5));
      }
    })();
    await conn.write(data, { timeoutMs: 60_000 });
    await conn.close({ timeoutMs: 60_000 }); // SHUTDOWN(both) while bytes are still queued
    await reader;
    const all = concat(received);
    assert.equal(total, data.length, "every byte the guest wrote reached the host app");
    assert.deepEqual(all, data);
    assert.equal(conn.closeReason === "close-timeout", false, "the back end sent the RST");
    host.close();
  } finally {
    const exit = await vm.stop();
    assert.doesNotMatch(exit.stderr, /ERROR/);
  }
});
