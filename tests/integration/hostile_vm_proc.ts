/**
 * A hostile VM, run as its own process by isolation_test.ts (so that generating the attack
 * does not take the CPU of the test process, which drives the well-behaved VM's guest):
 *
 *     deno run -A hostile_vm_proc.ts <vhost-user socket> <uds path> <attack>
 *
 * Attacks:
 * - `header-only`: the guest posts rx buffers with room for a header and no payload while a
 *   host app streams data to it (the hostile-guest livelock shape);
 * - `kick-storm`: the guest kicks its tx and rx queues in bursts of KICK_BURST every
 *   millisecond (each kick wakes the worker; a real guest's kicks cost it a vCPU exit each);
 * - `flood`: the front end sends vhost-user requests back to back (GET_FEATURES,
 *   GET_PROTOCOL_FEATURES, GET_QUEUE_NUM), FLOOD_BURST round trips per millisecond;
 * - `truncate`: the front end truncates the guest-RAM memfd to 0 bytes, then kicks; the
 *   worker serving this VM dies with SIGBUS.
 *
 * Prints `attacking` on stdout once the attack runs; runs until killed (or, for `truncate`,
 * until the back end hangs up).
 */
import { sys } from "../../ffi/libc.ts";
import { dup } from "../../ffi/mod.ts";
import {
  GuestRam,
  hostConnect,
  VhostUserFrontEnd,
  VSOCK_VQ_RX,
  VSOCK_VQ_TX,
  VsockGuest,
} from "../../lib/testing/mod.ts";

const [socketPath, udsPath, attack] = Deno.args;
/** Kicks and requests per millisecond: a storm, bounded so that on a 2-core CI machine the
 * attacker process itself does not take the CPU the measured VM needs. */
const KICK_BURST = Number(Deno.env.get("KICK_BURST") ?? 100);
const FLOOD_BURST = Number(Deno.env.get("FLOOD_BURST") ?? 50);
const memory = new GuestRam({});
const fe = await VhostUserFrontEnd.connect(socketPath, { profile: "qemu", memory });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const say = (line: string) => Deno.stdout.writeSync(new TextEncoder().encode(line + "\n"));

if (attack === "header-only") {
  const guest = await VsockGuest.boot(fe, { rxBufSize: 0 });
  const listener = guest.listen(5000);
  const [host] = await Promise.all([hostConnect(udsPath, 5000), listener.accept()]);
  say("attacking");
  const chunk = new Uint8Array(64 * 1024);
  for (;;) {
    await Promise.race([host.conn.write(chunk), sleep(100)]);
    guest.pump();
    await sleep(1);
  }
} else if (attack === "kick-storm") {
  const guest = await VsockGuest.boot(fe, {});
  say("attacking");
  for (;;) {
    for (let i = 0; i < KICK_BURST; i++) {
      fe.kick(VSOCK_VQ_TX);
      fe.kick(VSOCK_VQ_RX);
    }
    guest.pump();
    await sleep(1);
  }
} else if (attack === "flood") {
  await VsockGuest.boot(fe, {});
  say("attacking");
  for (;;) {
    for (let i = 0; i < FLOOD_BURST; i++) {
      fe.getFeatures();
      fe.getProtocolFeatures();
      fe.getQueueNum();
    }
    await sleep(1);
  }
} else if (attack === "truncate") {
  const guest = await VsockGuest.boot(fe, {});
  const fds = memory.regions.map((r) => dup(r.fd));
  // Nothing in this process may touch the RAM once it is truncated: stop the driver, unmap.
  await guest.close();
  memory.close();
  for (const fd of fds) sys.ftruncate(fd, 0n);
  say("attacking");
  fe.kick(VSOCK_VQ_TX);
  fe.kick(VSOCK_VQ_RX);
  await sleep(60_000);
} else {
  throw new Error(`unknown attack ${attack}`);
}
