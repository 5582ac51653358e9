/**
 * The reactor: one epoll loop per thread, run to completion, no locks.
 *
 * Everything one VM needs (the vhost-user control socket, the kick eventfds,
 * host sockets, timers) is registered with the same reactor, so control-plane
 * messages and data-plane events are handled in one program order: a kick can
 * never be "seen" by a data thread before the SET_VRING_ENABLE that precedes it
 * on the control socket has been handled (the "never drop a kick" race cannot happen).
 *
 * - fd handlers: level- or edge-triggered, dispatched by fd number.
 * - timers: a binary heap of deadlines behind one timerfd (no Deno timers: a
 *   thread blocked in epoll_wait never runs Deno's own event loop).
 * - wakeup: an eventfd other threads write to (`wakeFd`), e.g. to stop the loop.
 * - end-of-batch hooks: run after each epoll batch, so devices can publish used
 *   rings and signal the guest once per batch instead of once per packet.
 * - heartbeat (optional): a counter in shared memory, bumped on entering and on leaving
 *   epoll_wait (odd while waiting), that a watchdog in another process reads: an even value
 *   that does not change means the reactor is stuck in a handler.
 */
import {
  close,
  Epoll,
  EPOLLIN,
  eventFd,
  eventFdRead,
  eventFdWrite,
  timerFd,
  timerFdArm,
} from "../ffi/mod.ts";
import { log } from "./log.ts";

/** Called with the epoll event bits when `fd` is ready. */
export type FdHandler = (events: number) => void;

/** A pending timer; `cancel()` is idempotent. */
export class Timer {
  cancelled = false;
  constructor(readonly deadline: number, readonly seq: number, readonly fn: () => void) {}
  cancel(): void {
    this.cancelled = true;
  }
}

const MAX_EVENTS = 256;

export class Reactor {
  readonly #epoll = new Epoll(MAX_EVENTS);
  readonly #handlers: (FdHandler | undefined)[] = [];
  readonly #timerFd = timerFd();
  readonly #timers: Timer[] = [];
  #timerSeq = 0;
  #armedDeadline = Infinity;
  /** write 1 to this eventfd (from any thread) to make `run` return to its caller's check */
  readonly wakeFd: number = eventFd();
  readonly #wakeHandlers: (() => void)[] = [];
  readonly #batchEnd = new Set<() => void>();
  #stopped = false;
  #closed = false;
  /** the next epoll_wait must not sleep (`again`) */
  #again = false;
  #heartbeat: Int32Array | null = null;
  #heartbeatIndex = 0;

  constructor() {
    this.#epoll.add(this.#timerFd, EPOLLIN);
    this.#handlers[this.#timerFd] = () => this.#fireTimers();
    this.#epoll.add(this.wakeFd, EPOLLIN);
    this.#handlers[this.wakeFd] = () => {
      eventFdRead(this.wakeFd);
      for (const h of this.#wakeHandlers) h();
    };
  }

  /** Registers `fd` for `events` (EPOLLIN, EPOLLOUT, EPOLLET...). */
  addFd(fd: number, events: number, handler: FdHandler): void {
    this.#epoll.add(fd, events);
    this.#handlers[fd] = handler;
  }

  /** Changes the event mask of a registered fd. */
  modifyFd(fd: number, events: number): void {
    this.#epoll.modify(fd, events);
  }

  /** Unregisters `fd` (does not close it). Safe to call for unknown fds. */
  removeFd(fd: number): void {
    if (this.#handlers[fd] === undefined) return;
    this.#handlers[fd] = undefined;
    this.#epoll.delete(fd);
  }

  /** Whether `fd` has a handler. */
  has(fd: number): boolean {
    return this.#handlers[fd] !== undefined;
  }

  /** Runs `fn` once, `ms` milliseconds from now, on this reactor. */
  setTimer(ms: number, fn: () => void): Timer {
    const t = new Timer(performance.now() + ms, this.#timerSeq++, fn);
    this.#heapPush(t);
    this.#rearm();
    return t;
  }

  /** Runs `fn` after every epoll batch until `offBatchEnd(fn)`. */
  onBatchEnd(fn: () => void): void {
    this.#batchEnd.add(fn);
  }
  offBatchEnd(fn: () => void): void {
    this.#batchEnd.delete(fn);
  }

  /** Runs `fn` whenever another thread writes `wakeFd`. */
  onWake(fn: () => void): void {
    this.#wakeHandlers.push(fn);
  }

  /** Wakes the loop (callable from any thread that knows `wakeFd`). */
  wake(): void {
    eventFdWrite(this.wakeFd);
  }

  /**
   * Asks for another batch at once (from this thread: a handler or hook that stopped with
   * work left, to let other fds in first): the next epoll_wait does not sleep. Cheaper than
   * `wake`, which costs an eventfd write and read.
   */
  again(): void {
    this.#again = true;
  }

  /**
   * Publishes progress in `cells[index]` (shared memory a watchdog reads): +1 before each
   * epoll_wait and +1 after it, so the value is odd exactly while the reactor waits.
   */
  setHeartbeat(cells: Int32Array, index: number): void {
    this.#heartbeat = cells;
    this.#heartbeatIndex = index;
  }

  /** Makes `run` return after the current batch. */
  stop(): void {
    this.#stopped = true;
  }

  get stopped(): boolean {
    return this.#stopped;
  }

  /** Waits up to `timeoutMs` for events, dispatches them, runs batch-end hooks. */
  runOnce(timeoutMs: number): number {
    const beat = this.#heartbeat;
    if (beat !== null) Atomics.add(beat, this.#heartbeatIndex, 1);
    const n = this.#epoll.wait(this.#again ? 0 : timeoutMs);
    this.#again = false;
    if (beat !== null) Atomics.add(beat, this.#heartbeatIndex, 1);
    const ev = this.#epoll.events;
    for (let i = 0; i < n; i++) {
      const h = this.#handlers[ev[3 * i + 1]];
      if (h === undefined) continue;
      try {
        h(ev[3 * i]);
      } catch (e) {
        log.error(`reactor: handler for fd ${ev[3 * i + 1]} threw: ${errText(e)}`);
      }
    }
    for (const fn of this.#batchEnd) {
      try {
        fn();
      } catch (e) {
        log.error(`reactor: batch-end hook threw: ${errText(e)}`);
      }
    }
    return n;
  }

  /**
   * Busy polling (`--poll-us`, off at 0): for this many microseconds after a batch that had
   * events, the loop asks epoll without sleeping instead of blocking in epoll_wait, so the
   * next kick or host packet is handled without a thread wake-up (vhost-net's
   * busyloop_timeout does the same). It costs a CPU spinning while traffic is bursty.
   */
  pollUs = 0;

  /** Runs until `stop()`. Blocks the calling thread in epoll_wait (or polls: `pollUs`). */
  run(): void {
    this.#stopped = false;
    let lastActive = -Infinity;
    while (!this.#stopped) {
      const polling = this.pollUs > 0 && performance.now() - lastActive < this.pollUs / 1000;
      if (this.runOnce(polling ? 0 : -1) > 0) lastActive = performance.now();
    }
  }

  /** Closes the reactor's own fds (not the registered ones). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#epoll.close();
    close(this.#timerFd);
    close(this.wakeFd);
  }

  #fireTimers(): void {
    eventFdRead(this.#timerFd); // timerfd reads like an eventfd: 8-byte expiry count
    this.#armedDeadline = Infinity;
    const now = performance.now();
    while (this.#timers.length > 0 && this.#timers[0].deadline <= now + 0.5) {
      const t = this.#heapPop();
      if (t.cancelled) continue;
      t.cancelled = true;
      try {
        t.fn();
      } catch (e) {
        log.error(`reactor: timer threw: ${errText(e)}`);
      }
    }
    this.#rearm();
  }

  #rearm(): void {
    while (this.#timers.length > 0 && this.#timers[0].cancelled) this.#heapPop();
    const next = this.#timers.length > 0 ? this.#timers[0].deadline : Infinity;
    if (next === this.#armedDeadline) return;
    this.#armedDeadline = next;
    if (next === Infinity) timerFdArm(this.#timerFd, 0);
    else timerFdArm(this.#timerFd, Math.max(0.001, next - performance.now()));
  }

  #less(a: Timer, b: Timer): boolean {
    return a.deadline < b.deadline || (a.deadline === b.deadline && a.seq < b.seq);
  }

  #heapPush(t: Timer): void {
    const h = this.#timers;
    h.push(t);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.#less(h[i], h[p])) break;
      [h[i], h[p]] = [h[p], h[i]];
      i = p;
    }
  }

  #heapPop(): Timer {
    const h = this.#timers;
    const top = h[0];
    const last = h.pop()!;
    if (h.length > 0) {
      h[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1, r = l + 1;
        let m = i;
        if (l < h.length && this.#less(h[l], h[m])) m = l;
        if (r < h.length && this.#less(h[r], h[m])) m = r;
        if (m === i) break;
        [h[i], h[m]] = [h[m], h[i]];
        i = m;
      }
    }
    return top;
  }
}

function errText(e: unknown): string {
  return e instanceof Error ? (e.stack ?? e.message) : String(e);
}
