/**
 * The supervisor: the thread that owns the process (signals, exit) and runs the
 * reactors in Worker threads.
 *
 * A Worker blocked in a synchronous epoll_wait cannot be `terminate()`d, so it
 * is stopped by setting a shared flag and writing its wakeup eventfd; it then
 * closes its sockets (removing their files) and reports back.
 */
import { eventFdWrite } from "../ffi/mod.ts";
import type { DaemonConfig } from "./config.ts";

export interface RunningDaemon {
  /** asks the reactor to stop; resolves once sockets are closed */
  stop(): Promise<void>;
  /** resolves when the daemon stopped (by `stop()`) */
  readonly stopped: Promise<void>;
}

/** Starts the daemon in a Worker; resolves once every socket is listening. */
export function startDaemon(config: DaemonConfig): Promise<RunningDaemon> {
  const worker = new Worker(new URL("./worker.ts", import.meta.url).href, { type: "module" });
  const control = new SharedArrayBuffer(4);
  const flags = new Int32Array(control);
  let resolveStopped!: () => void;
  const stopped = new Promise<void>((r) => (resolveStopped = r));
  return new Promise((resolve, reject) => {
    let wakeFd = -1;
    worker.onmessage = (e: MessageEvent) => {
      const m = e.data;
      if (m.type === "ready") {
        wakeFd = m.wakeFd;
        resolve({
          stop() {
            if (Atomics.exchange(flags, 0, 1) === 0 && wakeFd >= 0) eventFdWrite(wakeFd);
            return stopped;
          },
          stopped,
        });
      } else if (m.type === "error") {
        worker.terminate();
        reject(new Error(m.message));
      } else if (m.type === "stopped") {
        worker.terminate();
        resolveStopped();
      }
    };
    worker.onerror = (e) => {
      e.preventDefault();
      reject(new Error(e.message));
    };
    worker.postMessage({ config, control });
  });
}
