/**
 * Property tests for lib/config.ts: arbitrary --vm specs, command lines, YAML text and YAML
 * files shaped like configurations give a valid configuration or a one-line ConfigError,
 * never anything else.
 */

import assert from "node:assert/strict";
import fc from "fast-check";
import { stringify } from "yaml";
import {
  ConfigError,
  parseArgs,
  parseConfigYaml,
  parseVmSpec,
  type VmConfig,
} from "../../lib/config.ts";
import { assertValidVms } from "./config_fixture.ts";

// ---------------------------------------------------------------------------------------------
// Properties: any input gives a valid configuration or a one-line ConfigError

function outcome(fn: () => VmConfig[], fromFd = false): "ok" | "error" {
  try {
    assertValidVms(fn(), fromFd);
    return "ok";
  } catch (e) {
    if (e instanceof ConfigError && !e.message.includes("\n")) return "error";
    throw e;
  }
}

const keyArb = fc.constantFrom(
  "guest-cid",
  "guest_cid",
  "socket",
  "socket-path",
  "uds-path",
  "uds_path",
  "tx-buffer-size",
  "queue-size",
  "queue_size",
  "groups",
  "group",
  "",
  "__proto__",
);
const valueArb = fc.oneof(
  fc.string(),
  fc.string({ unit: "binary" }),
  fc.nat().map(String),
  fc.constantFrom("0", "2", "3", "4", "1024", "32768", "4294967295", "a+b", "+", "/tmp/x", "="),
);

Deno.test("property: arbitrary --vm specs", () => {
  const seen = { ok: 0, error: 0 };
  fc.assert(
    fc.property(
      fc.oneof(
        fc.string({ unit: "binary" }),
        fc.array(fc.tuple(keyArb, valueArb), { maxLength: 7 })
          .map((items) => items.map(([k, v]) => `${k}=${v}`).join(",")),
      ),
      (spec) => {
        seen[outcome(() => [parseVmSpec(spec)])]++;
      },
    ),
    { numRuns: 2000 },
  );
  assert.ok(seen.ok > 0 && seen.error > 0, JSON.stringify(seen));
});

Deno.test("property: arbitrary command lines", () => {
  const flag = fc.constantFrom(
    ...Object.keys({
      "--guest-cid": 0,
      "--socket": 0,
      "--socket-path": 0,
      "--uds-path": 0,
      "--tx-buffer-size": 0,
      "--queue-size": 0,
      "--groups": 0,
      "--fd": 0,
      "--vm": 0,
      "--log-level": 0,
      "--dgram": 0,
      "--connect-timeout-ms": 0,
      "--max-connections": 0,
      "--": 0,
      "-": 0,
      "--bogus": 0,
    }),
  );
  const arg = fc.oneof(
    flag,
    valueArb,
    fc.tuple(flag, valueArb).map(([f, v]) => `${f}=${v}`),
    fc.tuple(keyArb, valueArb).map(([k, v]) => `${k}=${v}`),
  );
  const seen = { ok: 0, error: 0 };
  fc.assert(
    fc.property(fc.array(arg, { maxLength: 8 }), (argv) => {
      seen[
        outcome(() => {
          const cfg = parseArgs(argv);
          assert.ok(["error", "warn", "info", "debug", "trace"].includes(cfg.logLevel));
          assert.ok(cfg.connectTimeoutMs >= 1 && cfg.maxConnections >= 1);
          return cfg.vms;
        }, argv.some((a) => a.startsWith("--fd")))
      ]++;
    }),
    { numRuns: 3000 },
  );
  assert.ok(seen.ok > 0 && seen.error > 0, JSON.stringify(seen));
});

Deno.test("property: arbitrary YAML text", () => {
  fc.assert(
    fc.property(fc.string({ unit: "binary", maxLength: 200 }), (text) => {
      outcome(() => parseConfigYaml(text));
    }),
    { numRuns: 2000 },
  );
  fc.assert(
    fc.property(fc.anything(), (value) => {
      outcome(() => parseConfigYaml(stringify(value)));
      outcome(() => parseConfigYaml(stringify({ vms: value })));
      outcome(() => parseConfigYaml(stringify({ vms: [value] })));
    }),
    { numRuns: 500 },
  );
});

Deno.test("property: YAML files shaped like configurations", () => {
  const scalar = fc.oneof(
    fc.integer({ min: -1, max: 70000 }),
    fc.constantFrom(0xffffffff, 2 ** 32, 2.5, null, true, "/tmp/a", "/tmp/b", "a+b", "", "x"),
    fc.bigInt({ min: 0n, max: 2n ** 64n }),
    fc.array(fc.constantFrom("a", "b", "", "c+d", 1), { maxLength: 3 }),
    fc.string(),
  );
  const entry = fc.dictionary(keyArb, scalar, { maxKeys: 6 });
  const seen = { ok: 0, error: 0 };
  fc.assert(
    fc.property(fc.array(entry, { maxLength: 4 }), (vms) => {
      seen[outcome(() => parseConfigYaml(stringify({ vms })))]++;
    }),
    { numRuns: 2000 },
  );
  assert.ok(seen.ok > 0 && seen.error > 0, JSON.stringify(seen));
});
