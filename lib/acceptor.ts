/**
 * Accepting connections on a listening socket without spinning when accept(2) fails.
 *
 * A listening fd is registered level-triggered: while a connection waits in its backlog,
 * epoll reports it on every wait. When accept() cannot take that connection for lack of a
 * resource (EMFILE: this process is out of fds; ENFILE: the system is; ENOBUFS/ENOMEM), the
 * connection stays in the backlog, so a handler that just returns is called again at once:
 * the reactor spins at 100% CPU and logs one line per turn for as long as the shortage
 * lasts. The fix is the usual one (as in nginx and libuv): on such an error stop watching the
 * fd, and watch it again after a back-off (BACKOFF_FIRST_MS, doubling up to BACKOFF_MAX_MS,
 * back to the first value after the next successful accept), with the log lines rate-limited.
 *
 * Errors that concern only the connection being accepted (ECONNABORTED: the peer gave up
 * while in the backlog; EINTR) are skipped and the loop goes on; EAGAIN ends it. Every other
 * error is treated as a shortage and backs off.
 *
 * At most MAX_ACCEPTS_PER_WAKEUP connections are taken per wakeup, so a connect storm cannot
 * starve the other fds of the reactor: the listening fd stays ready and is served again in the
 * next batch, after the handlers of the connections just accepted had their turn.
 *
 * Usage (the owner keeps the listening fd and closes it after `stop()`):
 *
 * ```ts
 * const acceptor = new Acceptor(reactor, listenFd, "vsock: host apps", (fd) => adopt(fd));
 * acceptor.start();
 * // ...
 * acceptor.stop();
 * close(listenFd);
 * ```
 */
import { acceptRaw, EAGAIN, ECONNABORTED, EINTR, EPOLLIN, errnoName } from "../ffi/mod.ts";
import { log, LogLimiter } from "./log.ts";
import type { Reactor, Timer } from "./reactor.ts";

/** First pause after a failed accept(), in milliseconds. */
export const BACKOFF_FIRST_MS = 100;
/** Longest pause after repeated failures, in milliseconds. */
export const BACKOFF_MAX_MS = 1000;
/** Connections accepted per wakeup of the listening fd before yielding to other fds. */
export const MAX_ACCEPTS_PER_WAKEUP = 64;

/** Receives each accepted fd (non-blocking, close-on-exec); it now belongs to the callee. */
export type AcceptHandler = (fd: number) => void;

export class Acceptor {
  #watching = false;
  #stopped = true;
  #retry: Timer | null = null;
  #backoffMs = BACKOFF_FIRST_MS;
  readonly #failLog: LogLimiter;

  constructor(
    readonly reactor: Reactor,
    /** a listening, non-blocking socket; the Acceptor never closes it */
    readonly fd: number,
    /** names the socket in log lines, e.g. "vsock: host apps on /run/vm.sock" */
    readonly what: string,
    readonly onAccept: AcceptHandler,
  ) {
    this.#failLog = new LogLimiter(`${what}: accept failures`, 1, 5000);
  }

  /** Starts watching the listening fd. */
  start(): void {
    this.#stopped = false;
    this.#watch();
  }

  /** Stops watching (and cancels a pending retry). Does not close the fd. Idempotent. */
  stop(): void {
    this.#stopped = true;
    this.#retry?.cancel();
    this.#retry = null;
    this.#unwatch();
  }

  /** Whether accepting is paused after a failure (waiting for the retry timer). */
  get backingOff(): boolean {
    return this.#retry !== null;
  }

  #watch(): void {
    if (this.#watching || this.#stopped) return;
    this.reactor.addFd(this.fd, EPOLLIN, () => this.#accept());
    this.#watching = true;
  }

  #unwatch(): void {
    if (!this.#watching) return;
    this.reactor.removeFd(this.fd);
    this.#watching = false;
  }

  #accept(): void {
    for (let i = 0; i < MAX_ACCEPTS_PER_WAKEUP && !this.#stopped; i++) {
      const fd = acceptRaw(this.fd);
      if (fd >= 0) {
        this.#backoffMs = BACKOFF_FIRST_MS;
        this.onAccept(fd);
        continue;
      }
      if (fd === -EAGAIN) return;
      if (fd === -ECONNABORTED || fd === -EINTR) continue;
      this.#backOff(-fd);
      return;
    }
  }

  /** accept() failed for want of a resource: pause, then watch the fd again. */
  #backOff(errno: number): void {
    const ms = this.#backoffMs;
    if (this.#failLog.allow()) {
      log.warn(`${this.what}: accept failed (${errnoName(errno)}); pausing accepts for ${ms} ms`);
    }
    this.#backoffMs = Math.min(ms * 2, BACKOFF_MAX_MS);
    this.#unwatch();
    this.#retry = this.reactor.setTimer(ms, () => {
      this.#retry = null;
      this.#watch();
    });
  }
}
