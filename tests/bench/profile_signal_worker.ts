/**
 * Worker of profile_backend.ts: on SIGTERM or SIGINT, sets the shared stop flag and writes the
 * reactor's wakeup eventfd (the main thread is blocked in epoll_wait and cannot see signals).
 */
/// <reference lib="deno.worker" />
import { eventFdWrite } from "../../ffi/mod.ts";

self.onmessage = (e: MessageEvent<{ control: SharedArrayBuffer; wakeFd: number }>) => {
  const flags = new Int32Array(e.data.control);
  const stop = () => {
    if (Atomics.exchange(flags, 0, 1) === 0) eventFdWrite(e.data.wakeFd);
  };
  Deno.addSignalListener("SIGTERM", stop);
  Deno.addSignalListener("SIGINT", stop);
  self.postMessage("ready");
};
