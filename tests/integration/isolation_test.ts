/**
 * Isolation (`--workers`): what one VM's guest, front end or host apps do cannot stall or
 * crash another VM of the same daemon, and a VM whose worker process died is served again.
 *
 * Two VMs on two workers: VM 0 (CID 3) is attacked by a hostile guest/front end running in
 * its own process (`hostile_vm_proc.ts`); VM 1 (CID 4) is a normal guest whose host -> guest
 * transfer and ping-pong latency are measured alone and under each attack.
 */
import assert from "node:assert/strict";
import {
  bootGuest,
  multiVmDaemon,
  pingPongP99,
  transfer,
  waitFor,
  workerPid,
} from "./isolation_helpers.ts";
import { hostConnect, readExactly, writeAll } from "../../lib/testing/mod.ts";

const TRANSFER_BYTES = 16 << 20;
/** lets the attacker's own start-up (a Deno process) pass before measuring */
const SETTLE_MS = 300;
const ATTEMPTS = 5;
const servedAgain = (log: string) =>
  (log.match(/worker 0 \(CID 3\) is serving again/g) ?? []).length;
const SIGBUS_DEATH = /worker 0 \(CID 3\) died: killed by SIGBUS \(exit 135\); restarting/g;
const ATTACKS = ["header-only", "kick-storm", "flood", "truncate"] as const;
/** e.g. KICK_BURST=1000 for an unbounded storm (see hostile_vm_proc.ts) */
const ATTACK_ENV = Object.fromEntries(
  ["KICK_BURST", "FLOOD_BURST"].flatMap((k) => Deno.env.get(k) ? [[k, Deno.env.get(k)!]] : []),
);

function startAttack(socket: string, uds: string, attack: string) {
  const proc = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      new URL("./hostile_vm_proc.ts", import.meta.url).pathname,
      socket,
      uds,
      attack,
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "null",
    env: ATTACK_ENV,
  }).spawn();
  const started = (async () => {
    const reader = proc.stdout.getReader();
    let text = "";
    while (!text.includes("attacking")) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`the ${attack} attacker exited before attacking`);
      text += new TextDecoder().decode(value);
    }
    reader.releaseLock();
    void proc.stdout.cancel();
  })();
  return {
    started,
    async stop() {
      try {
        proc.kill("SIGKILL");
      } catch { /* exited */ }
      await proc.status;
    },
  };
}

Deno.test("isolation: a hostile VM neither stalls nor crashes the other VM of the daemon", async () => {
  const d = await multiVmDaemon(2, ["--workers", "2"]);
  const normal = await bootGuest(d.socket(1));
  const report: string[] = [];
  try {
    await transfer(normal, d.uds(1), 6000, 4 << 20); // warm-up
    let port = 6100;
    // Speeds are the best of two runs (the CI machine is shared); "alone" is measured right
    // before each attack, so that both numbers see the same background load.
    const best = async () =>
      Math.max(
        await transfer(normal, d.uds(1), port++, TRANSFER_BYTES),
        await transfer(normal, d.uds(1), port++, TRANSFER_BYTES),
      );
    for (const attack of ATTACKS) {
      // A shared CI machine has pauses of its own: an attack passes if one of ATTEMPTS
      // measurements meets both bounds; every measurement is reported.
      let passed = false;
      for (let attempt = 0; attempt < ATTEMPTS && !passed; attempt++) {
        const aloneBefore = await best();
        let speed = 0;
        let p99 = Infinity;
        const p99Alone = await pingPongP99(normal, d.uds(1), port++);
        const attacker = startAttack(d.socket(0), d.uds(0), attack);
        try {
          await attacker.started;
          if (attack !== "truncate") await new Promise((r) => setTimeout(r, SETTLE_MS));
          if (attack === "truncate") {
            // The transfer that overlaps the crash and the restart completes intact; its speed
            // is reported, not bounded: starting a Deno process takes ~1 CPU-second, half of a
            // 2-core machine. The bounds apply once the dead worker is serving again.
            const during = await transfer(normal, d.uds(1), port++, TRANSFER_BYTES);
            report.push(`truncate, during the restart: ${during.toFixed(0)} MB/s`);
            await waitFor(() => servedAgain(d.backend.stderr()) > attempt, "the restart");
          }
          speed = await best();
          p99 = await pingPongP99(normal, d.uds(1), port++);
        } finally {
          await attacker.stop();
        }
        // "Alone" is measured before and after the attack, and the lower one counts: the
        // machine's own background load moves both numbers by 2x and more between runs.
        const alone = Math.min(aloneBefore, await best());
        report.push(
          `${attack}: ${speed.toFixed(0)} MB/s vs ${alone.toFixed(0)} alone (${
            (100 * speed / alone).toFixed(0)
          }%), ping-pong p99 ${p99.toFixed(2)} ms vs ${p99Alone.toFixed(2)} alone`,
        );
        passed = speed >= 0.7 * alone && p99 < 5;
        if (attack === "truncate") {
          await waitFor(
            () => (d.backend.stderr().match(SIGBUS_DEATH) ?? []).length > attempt,
            "the SIGBUS death line",
          );
        }
        // The hostile VM is served again: a fresh front end + guest works.
        const fresh = await bootGuest(d.socket(0));
        try {
          await transfer(fresh, d.uds(0), 7000, 64 * 1024);
        } finally {
          await fresh.close();
        }
      }
      assert.ok(passed, `${attack}: below 70% speed or p99 >= 5 ms in every attempt`);
    }
  } finally {
    console.log(`normal VM (16 MiB host -> guest):\n  ${report.join("\n  ")}`);
    await normal.close();
    const exit = await d.backend.stop();
    assert.equal(exit.code, 0, exit.stderr);
  }
});

Deno.test("restart: kill -9 of one VM's worker mid-transfer; the others carry on, its host sockets see EOF, it is served again", async () => {
  const d = await multiVmDaemon(3, ["--workers", "3"]);
  const guests = await Promise.all([0, 1, 2].map((i) => bootGuest(d.socket(i))));
  try {
    // A transfer on VM 1 (the victim) that will be cut, and ones on VMs 0 and 2 that must not.
    const listener = guests[1].guest.listen(5000);
    const [victim] = await Promise.all([hostConnect(d.uds(1), 5000), listener.accept()]);
    const big = new Uint8Array(64 << 20);
    const cut = writeAll(victim.conn, big).then(() => "written", (e) => String(e));
    const others = [0, 2].map((i) => transfer(guests[i], d.uds(i), 5100 + i, 16 << 20));
    await new Promise((r) => setTimeout(r, 50));
    const pid = workerPid(d.backend.pid, 1);
    assert.ok(pid > 0, "worker 1 found");
    const killedAt = performance.now();
    Deno.kill(pid, "SIGKILL");
    // The victim's host app sees its socket closed (EOF or reset), not a hang.
    const end = await readExactly(victim.conn, 1, { timeoutMs: 5000 }).then(
      () => "data",
      (e) => String(e),
    );
    assert.doesNotMatch(end, /^data$|timed? ?out/i);
    assert.notEqual(await cut, "written");
    victim.conn.close();
    for (const speed of await Promise.all(others)) assert.ok(speed > 0);
    await waitFor(
      () =>
        /worker 1 \(CID 4\) died: killed by SIGKILL \(exit 137\); restarting/.test(
          d.backend.stderr(),
        ),
      "the death line",
    );
    // Its socket accepts a new front end; the guest behind it works.
    const fresh = await bootGuest(d.socket(1));
    const servedAgainMs = performance.now() - killedAt;
    try {
      await transfer(fresh, d.uds(1), 5200, 1 << 20);
    } finally {
      await fresh.close();
    }
    console.log(`served again ${servedAgainMs.toFixed(0)} ms after kill -9`);
    assert.ok(servedAgainMs < 3000, `served again after ${servedAgainMs.toFixed(0)} ms`);
    // The other VMs' guests are still fine.
    for (const i of [0, 2]) await transfer(guests[i], d.uds(i), 5300 + i, 1 << 20);
  } finally {
    for (const g of [guests[0], guests[2]]) await g.close();
    await guests[1].close().catch(() => {});
    const exit = await d.backend.stop();
    assert.equal(exit.code, 0, exit.stderr);
  }
});

Deno.test("watchdog: a blocked reactor is reported within --watchdog-ms; with --watchdog-restart it is restarted", async () => {
  for (const restart of [false, true]) {
    const d = await multiVmDaemon(
      2,
      ["--workers", "2", "--watchdog-ms", "300", ...(restart ? ["--watchdog-restart"] : [])],
      { env: { VHOST_USER_VSOCK_TEST_STALL: "4:200:1500" } },
    );
    try {
      const t0 = performance.now();
      await waitFor(
        () =>
          /watchdog: worker 1 \(CID 4\): the reactor has not returned to epoll_wait for 300 ms/
            .test(d.backend.stderr()),
        "the watchdog line",
        5000,
      );
      const ms = performance.now() - t0;
      assert.ok(ms < 1500, `reported after ${ms.toFixed(0)} ms`);
      if (restart) {
        await waitFor(
          () => /worker 1 \(CID 4\) died: killed by the watchdog/.test(d.backend.stderr()),
          "the restart",
        );
        const g = await bootGuest(d.socket(1));
        await transfer(g, d.uds(1), 5000, 1 << 20);
        await g.close();
      } else {
        await waitFor(
          () =>
            /watchdog: worker 1 \(CID 4\): the reactor is running again/.test(d.backend.stderr()),
          "the recovery line",
        );
      }
      // The other VM was never affected.
      const g = await bootGuest(d.socket(0));
      await transfer(g, d.uds(0), 5001, 1 << 20);
      await g.close();
    } finally {
      const exit = await d.backend.stop();
      assert.equal(exit.code, 0, exit.stderr);
    }
  }
});
