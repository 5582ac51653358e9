/** LogLimiter: a burst of lines, then silence counted, then one summary line. */
import assert from "node:assert/strict";
import { LogLimiter } from "../../lib/log.ts";

Deno.test("LogLimiter: lets a burst through, counts the rest, starts over after the interval", async () => {
  const lim = new LogLimiter("test lines", 3, 50, "debug");
  const allowed = Array.from({ length: 10 }, () => lim.allow()).filter((a) => a).length;
  assert.equal(allowed, 3);
  assert.equal(lim.suppressed, 7);
  await new Promise((r) => setTimeout(r, 60));
  assert.equal(lim.allow(), true);
  assert.equal(lim.suppressed, 0);
});
