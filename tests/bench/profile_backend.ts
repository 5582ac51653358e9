/**
 * Profiling harness: runs this repository's back end exactly as `main.ts` does (same flags,
 * same `Daemon`, reactor and data path), except that the reactor runs on the main thread and
 * a small worker (profile_signal_worker.ts) turns SIGTERM into the reactor's stop flag + wakeup.
 *
 * Why: `deno run --cpu-prof` writes the main thread's profile reliably at exit, but the
 * reactor Worker of main.ts is terminated right after it reports "stopped", which races with
 * the writing of its profile (`*.worker-1.cpuprofile` is often missing). Here the profiled
 * thread is the main one.
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
