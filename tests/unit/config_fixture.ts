/**
 * Shared by the unit tests of lib/config.ts: the one-line ConfigError assertion, a VM entry with
 * the documented defaults, and the invariants every accepted configuration satisfies.
 */

import assert from "node:assert/strict";
import { ConfigError, type VmConfig } from "../../lib/config.ts";

/** Assert that `fn` throws a ConfigError whose one-line message matches `pattern`. */
export function rejects(fn: () => unknown, pattern: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof ConfigError, `expected ConfigError, got ${e}`);
    assert.ok(!e.message.includes("\n"), `multi-line message: ${JSON.stringify(e.message)}`);
    assert.match(e.message, pattern);
    return true;
  });
}

/** A VM entry with the documented defaults (guest CID 3), `overrides` applied. */
export function vm(overrides: Partial<VmConfig> = {}): VmConfig {
  return {
    guestCid: 3,
    socket: "/tmp/vhost3.socket",
    udsPath: "/tmp/vm3.vsock",
    txBufferSize: 65536,
    queueSize: 1024,
    groups: ["default"],
    ...overrides,
  };
}

/** Invariants every accepted configuration satisfies. */
export function assertValidVms(vms: readonly VmConfig[], fromFd = false): void {
  assert.ok(vms.length >= 1);
  const cids = new Set<number>();
  const paths = new Set<string>();
  for (const v of vms) {
    assert.ok(Number.isInteger(v.guestCid) && v.guestCid >= 3 && v.guestCid <= 0xfffffffe);
    assert.ok(!cids.has(v.guestCid));
    cids.add(v.guestCid);
    for (const p of fromFd ? [v.udsPath] : [v.socket, v.udsPath]) {
      assert.equal(typeof p, "string");
      assert.ok(p.length > 0 && !p.includes("\0") && new TextEncoder().encode(p).length < 108);
      assert.ok(!paths.has(p));
      paths.add(p);
    }
    assert.ok(Number.isInteger(v.txBufferSize) && v.txBufferSize >= 1);
    assert.ok(v.txBufferSize <= 0xffffffff);
    assert.ok(Number.isInteger(v.queueSize) && v.queueSize >= 1 && v.queueSize <= 32768);
    assert.equal(v.queueSize & (v.queueSize - 1), 0);
    assert.ok(Array.isArray(v.groups) && v.groups.length >= 1);
    assert.equal(new Set(v.groups).size, v.groups.length);
    for (const g of v.groups) assert.ok(g.length > 0 && g === g.trim() && !g.includes("+"));
  }
}
