/**
 * Profiling harness: runs this repository's data path as a worker process of `main.ts` runs
 * it (same flags, same `Daemon`, reactor and data path), in one process with the reactor on
 * the main thread: no supervisor, no worker process, no watchdog heartbeat. A small worker
 * (profile_signal_worker.ts) turns SIGTERM into the reactor's stop flag + wakeup.
 *
 * Why: `deno run --cpu-prof` writes the main thread's profile reliably at exit, but a reactor
 * Worker is terminated right after it reports "stopped", which races with the writing of its
 * profile (`*.worker-1.cpuprofile` is often missing), and the flag would not reach the worker
 * processes main.ts spawns. Here the profiled thread is the main one: its profile is
 * `CPU.<time>.<pid>.cpuprofile`.
 *
 * Usage (as a bench back end):
 *   deno task bench --backend "deno run -A --cpu-prof --cpu-prof-dir=/tmp/prof \
 *     tests/bench/profile_backend.ts --guest-cid {cid} --socket {socket} --uds-path {uds}"
 */
import { parseArgs } from "../../lib/config.ts";
import { Daemon } from "../../lib/daemon.ts";
import { log } from "../../lib/log.ts";

const config = parseArgs(Deno.args);
log.setLevel(config.logLevel);
const daemon = new Daemon(config);
daemon.start();
const control = new SharedArrayBuffer(4);
const flags = new Int32Array(control);
const watcher = new Worker(new URL("./profile_signal_worker.ts", import.meta.url).href, {
  type: "module",
});
await new Promise<void>((resolve) => {
  watcher.onmessage = () => resolve();
  watcher.postMessage({ control, wakeFd: daemon.reactor.wakeFd });
});
log.info("profile harness: reactor on the main thread; SIGTERM stops it");
daemon.run(() => Atomics.load(flags, 0) === 1);
daemon.close();
watcher.terminate();
log.info("profile harness: stopped");
