/**
 * Worker entry: runs a `Daemon` on this thread's reactor.
 *
 * Protocol with the supervisor (`supervisor.ts`):
 * - in:  `{config, control: SharedArrayBuffer}` once;
 * - out: `{type: "ready", wakeFd}` after every socket listens, or `{type: "error", message}`;
 * - stop: the supervisor sets control[0] = 1 and writes `wakeFd` (this thread is
 *   blocked in epoll_wait and never runs its own event loop while serving);
 * - out: `{type: "stopped"}` after the sockets are closed and their files removed.
 */
/// <reference lib="deno.worker" />
import type { DaemonConfig } from "./config.ts";
import { Daemon } from "./daemon.ts";
import { log } from "./log.ts";

self.onmessage = (e: MessageEvent<{ config: DaemonConfig; control: SharedArrayBuffer }>) => {
  const { config, control } = e.data;
  const flags = new Int32Array(control);
  log.setLevel(config.logLevel);
  const daemon = new Daemon(config);
  try {
    daemon.start();
  } catch (err) {
    daemon.close();
    self.postMessage({ type: "error", message: err instanceof Error ? err.message : String(err) });
    return;
  }
  self.postMessage({ type: "ready", wakeFd: daemon.reactor.wakeFd });
  daemon.run(() => Atomics.load(flags, 0) === 1);
  daemon.close();
  self.postMessage({ type: "stopped" });
};
