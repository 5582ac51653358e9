import assert from "node:assert/strict";
import fc from "fast-check";
import { concat } from "../../lib/testing/bytes.ts";
import {
  type ConnectLineError,
  ConnectLineErrors,
  ConnectLineParser,
  type ConnectLineResult,
  formatOkLine,
  MAX_CONNECT_LINE,
} from "../../lib/vsock/connect_line.ts";

const enc = new TextEncoder();
const bytes = (s: string) => enc.encode(s);

function parseAll(...chunks: (string | Uint8Array)[]): ConnectLineResult {
  const p = new ConnectLineParser();
  let r: ConnectLineResult = { state: "need-more" };
  for (const c of chunks) {
    r = p.feed(typeof c === "string" ? bytes(c) : c);
    if (r.state !== "need-more") return r;
  }
  return r;
}

function okPort(r: ConnectLineResult): number {
  assert.equal(r.state, "ok", JSON.stringify(r));
  return (r as { port: number }).port;
}

function errReason(r: ConnectLineResult): ConnectLineError {
  assert.equal(r.state, "error", JSON.stringify(r));
  return (r as { reason: ConnectLineError }).reason;
}

Deno.test("parses the plain line", () => {
  const r = parseAll("CONNECT 1234\n");
  assert.equal(okPort(r), 1234);
  assert.equal((r as { rest: Uint8Array }).rest.length, 0);
});

Deno.test("accepts what Firecracker's whitespace splitting accepts", () => {
  const lines: [string, number][] = [
    ["connect 5\n", 5],
    ["CoNnEcT 5\n", 5],
    ["  CONNECT 5\n", 5],
    ["CONNECT    5\n", 5],
    ["CONNECT\t5\t\n", 5],
    ["CONNECT 5\r\n", 5],
    ["CONNECT 5 \r \n", 5],
    ["\r\x0b\x0cCONNECT 007\n", 7],
    ["CONNECT 0\n", 0],
    ["CONNECT 4294967295\n", 4294967295],
  ];
  for (const [line, port] of lines) assert.equal(okPort(parseAll(line)), port, line);
});

Deno.test("rejects malformed lines with a reason", () => {
  const cases: [string, ConnectLineError][] = [
    ["\n", ConnectLineErrors.BAD_KEYWORD],
    ["GET / HTTP/1.1\r\n", ConnectLineErrors.BAD_KEYWORD],
    ["CONNEC 1\n", ConnectLineErrors.BAD_KEYWORD],
    ["CONN\n", ConnectLineErrors.BAD_KEYWORD],
    ["CONNECTX 1\n", ConnectLineErrors.NO_SEPARATOR],
    ["CONNECT1\n", ConnectLineErrors.NO_SEPARATOR],
    ["CONNECT\n", ConnectLineErrors.NO_PORT],
    ["CONNECT   \n", ConnectLineErrors.NO_PORT],
    ["CONNECT +1\n", ConnectLineErrors.BAD_PORT],
    ["CONNECT -1\n", ConnectLineErrors.BAD_PORT],
    ["CONNECT 12a\n", ConnectLineErrors.BAD_PORT],
    ["CONNECT 0x10\n", ConnectLineErrors.BAD_PORT],
    ["CONNECT 4294967296\n", ConnectLineErrors.PORT_RANGE],
    ["CONNECT 99999999999999999999\n", ConnectLineErrors.PORT_RANGE],
    ["CONNECT 1 2\n", ConnectLineErrors.TRAILING],
    ["CONNECT 1 x\n", ConnectLineErrors.TRAILING],
    ["CONNECT\u00a01\n", ConnectLineErrors.NO_SEPARATOR],
    ["CONNECT 1\0\n", ConnectLineErrors.BAD_PORT],
  ];
  for (const [line, reason] of cases) assert.equal(errReason(parseAll(line)), reason, line);
});

Deno.test("fails fast, before the newline, on an impossible prefix", () => {
  const p = new ConnectLineParser();
  assert.equal(errReason(p.feed(bytes("GET"))), ConnectLineErrors.BAD_KEYWORD);
  assert.equal(p.bytesConsumed, 1);
});

Deno.test("data after the newline comes back as rest, without a copy", () => {
  const chunk = bytes("CONNECT 52\nhello\nCONNECT 1\n");
  const r = parseAll(chunk);
  assert.equal(okPort(r), 52);
  const rest = (r as { rest: Uint8Array }).rest;
  assert.equal(new TextDecoder().decode(rest), "hello\nCONNECT 1\n");
  assert.equal(rest.buffer, chunk.buffer);
  assert.equal(rest.byteOffset, 11);
});

Deno.test("the line may arrive one byte at a time", () => {
  const p = new ConnectLineParser();
  const line = bytes("connect 8080\nX");
  for (let i = 0; i < line.length - 2; i++) {
    assert.equal(p.feed(line.subarray(i, i + 1)).state, "need-more");
  }
  assert.equal(p.feed(new Uint8Array(0)).state, "need-more");
  const r = p.feed(line.subarray(line.length - 2));
  assert.equal(okPort(r), 8080);
  assert.deepEqual([...(r as { rest: Uint8Array }).rest], [0x58]);
});

Deno.test("line length is capped at MAX_CONNECT_LINE bytes, newline included", () => {
  assert.equal(MAX_CONNECT_LINE, 32);
  const fits = "CONNECT" + " ".repeat(32 - 7 - 2) + "9\n";
  assert.equal(fits.length, 32);
  assert.equal(okPort(parseAll(fits)), 9);
  const tooLong = "CONNECT" + " ".repeat(32 - 7 - 1) + "9\n";
  assert.equal(errReason(parseAll(tooLong)), ConnectLineErrors.TOO_LONG);

  const p = new ConnectLineParser();
  assert.equal(p.feed(bytes("CONNECT 1" + " ".repeat(22))).state, "need-more");
  assert.equal(p.bytesConsumed, 31);
  assert.equal(errReason(p.feed(bytes(" "))), ConnectLineErrors.TOO_LONG);
  assert.equal(p.bytesConsumed, 32);
});

Deno.test("errors are sticky and a finished parser refuses more input", () => {
  const p = new ConnectLineParser();
  assert.equal(errReason(p.feed(bytes("x"))), ConnectLineErrors.BAD_KEYWORD);
  assert.equal(errReason(p.feed(bytes("CONNECT 1\n"))), ConnectLineErrors.BAD_KEYWORD);
  const q = new ConnectLineParser();
  assert.equal(okPort(q.feed(bytes("CONNECT 1\n"))), 1);
  assert.equal(errReason(q.feed(bytes("more"))), ConnectLineErrors.FINISHED);
});

Deno.test("formatOkLine", () => {
  assert.equal(formatOkLine(1073741824), "OK 1073741824\n");
  assert.equal(formatOkLine(0), "OK 0\n");
  assert.throws(() => formatOkLine(-1), RangeError);
  assert.throws(() => formatOkLine(2 ** 32), RangeError);
});

// --- properties ---------------------------------------------------------------------------

const ws = fc.constantFrom(" ", "\t", "\r", "\x0b", "\x0c");
const wsRun = (min: number, max: number) =>
  fc.array(ws, { minLength: min, maxLength: max }).map((a) => a.join(""));

/** A valid line (within the cap) and its port. */
const validLine = fc
  .record({
    lead: wsRun(0, 3),
    kw: fc.array(fc.boolean(), { minLength: 7, maxLength: 7 }).map((up) =>
      [..."connect"].map((c, i) => up[i] ? c.toUpperCase() : c).join("")
    ),
    sep: wsRun(1, 3),
    zeros: fc.nat({ max: 2 }),
    port: fc.nat({ max: 0xffffffff }),
    trail: wsRun(0, 3),
  })
  .map((r) => ({
    line: `${r.lead}${r.kw}${r.sep}${"0".repeat(r.zeros)}${r.port}${r.trail}\n`,
    port: r.port,
  }))
  .filter((v) => v.line.length <= MAX_CONNECT_LINE);

/** Splits `data` at the given cut points (sorted, deduplicated, clamped). */
function split(data: Uint8Array, cuts: number[]): Uint8Array[] {
  const points = [...new Set(cuts.map((c) => c % (data.length + 1)))].sort((a, b) => a - b);
  const out: Uint8Array[] = [];
  let prev = 0;
  for (const p of points) {
    out.push(data.subarray(prev, p));
    prev = p;
  }
  out.push(data.subarray(prev));
  return out;
}

Deno.test("property: any split of a valid line gives the same port and the same trailing bytes", () => {
  fc.assert(
    fc.property(
      validLine,
      fc.uint8Array({ maxLength: 40 }),
      fc.array(fc.nat({ max: 1000 }), { maxLength: 8 }),
      ({ line, port }, tail, cuts) => {
        const lineBytes = bytes(line);
        const data = new Uint8Array(lineBytes.length + tail.length);
        data.set(lineBytes);
        data.set(tail, lineBytes.length);
        const chunks = split(data, cuts);
        const p = new ConnectLineParser();
        let i = 0;
        let r: ConnectLineResult = { state: "need-more" };
        for (; i < chunks.length; i++) {
          r = p.feed(chunks[i]);
          if (r.state !== "need-more") break;
        }
        assert.equal(okPort(r), port);
        assert.equal(p.bytesConsumed, lineBytes.length);
        // the caller forwards `rest` and then every later chunk as data
        const after = [(r as { rest: Uint8Array }).rest, ...chunks.slice(i + 1)];
        assert.deepEqual(concat(after), tail);
      },
    ),
    { numRuns: 1000 },
  );
});

/** Reference: the accepted grammar as a regular expression over a complete line. */
// deno-lint-ignore no-control-regex -- VT and FF are part of the accepted whitespace
const LINE_RE = /^[ \t\r\x0b\x0c]*connect[ \t\r\x0b\x0c]+([0-9]+)[ \t\r\x0b\x0c]*\n/i;

/** Bytes drawn mostly from the line's alphabet, so that near-valid lines are common. */
const lineishBytes = fc
  .array(
    fc.oneof(
      fc.constantFrom(
        ..."connectCONNECT 0123456789\t\r\n+-x".split("").map((c) => c.charCodeAt(0)),
      ),
      fc.nat({ max: 255 }),
    ),
    { maxLength: 48 },
  )
  .map((a) => Uint8Array.from(a));

Deno.test("property: arbitrary bytes never throw, never pass the cap, and agree with the grammar", () => {
  fc.assert(
    fc.property(
      fc.oneof(lineishBytes, fc.uint8Array({ maxLength: 64 })),
      fc.array(fc.nat({ max: 100 }), { maxLength: 6 }),
      (data, cuts) => {
        const p = new ConnectLineParser();
        let r: ConnectLineResult = { state: "need-more" };
        for (const c of split(data, cuts)) {
          r = p.feed(c);
          assert.ok(p.bytesConsumed <= MAX_CONNECT_LINE);
          if (r.state !== "need-more") break;
        }
        const nl = data.indexOf(0x0a);
        const m = nl >= 0 && nl < MAX_CONNECT_LINE
          ? LINE_RE.exec(String.fromCharCode(...data.subarray(0, nl + 1)))
          : null;
        if (m !== null && Number(m[1]) <= 0xffffffff) {
          assert.equal(okPort(r), Number(m[1]));
          assert.deepEqual((r as { rest: Uint8Array }).rest, data.subarray(nl + 1));
        } else if (nl >= 0 && nl < MAX_CONNECT_LINE) {
          errReason(r); // a complete line that does not match the grammar
        } else if (data.length >= MAX_CONNECT_LINE) {
          errReason(r); // 32 bytes without a newline
        } else {
          assert.notEqual(r.state, "ok"); // incomplete: need-more, or an early error
        }
      },
    ),
    { numRuns: 3000 },
  );
});
