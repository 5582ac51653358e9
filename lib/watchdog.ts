/**
 * The watchdog's view of one worker's reactor: the heartbeat counter the reactor bumps
 * around every epoll_wait (`Reactor.setHeartbeat`: odd while it waits), read from the
 * shared heartbeat file by the supervisor.
 *
 * An odd value is a reactor waiting for events: healthy however long it idles. An even value
 * that stays the same is a reactor inside one batch of handlers; once that has lasted
 * `limitMs` the reactor is stuck (a spin, a blocking call, a livelock) and `sample` says so,
 * once, and again when it moves on.
 */

export type WatchdogVerdict = "ok" | "stuck" | "recovered";

export class HeartbeatWatch {
  #last = -1;
  #since = 0;
  #stuck = false;

  constructor(
    readonly cells: Int32Array,
    readonly index: number,
    readonly limitMs: number,
  ) {}

  /** A new process starts at 0: forget what was seen. */
  reset(): void {
    Atomics.store(this.cells, this.index, 0);
    this.#last = -1;
    this.#stuck = false;
  }

  /** How long the reactor has been inside its current batch (0 while it waits). */
  busyMs(now: number): number {
    return (this.#last & 1) === 0 && this.#last >= 0 ? now - this.#since : 0;
  }

  /** Reads the counter at time `now` (ms, monotonic). */
  sample(now: number): WatchdogVerdict {
    const v = Atomics.load(this.cells, this.index);
    if (v !== this.#last) {
      this.#last = v;
      this.#since = now;
      if (this.#stuck) {
        this.#stuck = false;
        return "recovered";
      }
      return "ok";
    }
    if ((v & 1) === 0 && !this.#stuck && now - this.#since >= this.limitMs) {
      this.#stuck = true;
      return "stuck";
    }
    return "ok";
  }
}
