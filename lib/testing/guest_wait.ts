/**
 * Waiting and scheduling of the testing guest driver (`VsockGuest`): what a Linux guest gets
 * from interrupts and the scheduler, done with one poll loop.
 *
 * Every socket call that waits goes through `waitFor(predicate, timeoutMs)`, which pumps the
 * rings and then awaits `pollFdsAsync` on the call eventfds (plus the vhost-user socket, to
 * notice a dead back end) in slices of at most 100 ms, so Deno's event loop keeps running
 * host-side sockets in the same test. One poll is outstanding at a time however many callers
 * wait; an internal wake eventfd ends it early (a waiter with an earlier deadline, the front end
 * switched, the driver closed). Each wait ends with a `GuestTimeoutError` that describes the
 * rings and connections, or a `GuestConnError` when the back end hangs up.
 */

import {
  close as closeFd,
  eventFd,
  eventFdRead,
  eventFdWrite,
  POLLERR,
  pollFdsAsync,
  POLLHUP,
  POLLIN,
} from "../../ffi/mod.ts";
import { VSOCK_VQ_COUNT } from "../vsock/constants.ts";
import type { VhostUserFrontEnd } from "./front_end.ts";
import { GuestConnError } from "./guest_conn.ts";

/** Longest slice of one poll while waiting (bounds deadline overshoot). */
const POLL_SLICE_MS = 100;
const POLLNVAL = 0x20;

/** A wait ran out of time. The message says what was awaited and the state of the rings. */
export class GuestTimeoutError extends Error {
  override name = "GuestTimeoutError";
}

/** What the poll loop needs from the driver. */
export interface WaitHost {
  /** the front end currently in use (it changes on restore/attach) */
  frontEnd(): VhostUserFrontEnd;
  /** processes everything pending on the rings, then settles waiters */
  pump(): void;
  /** the rings and connections, for error messages */
  describe(): string;
  /** call eventfd signals observed, per queue (GuestStats.interrupts) */
  readonly interrupts: number[];
}

interface Waiter {
  readonly pred: () => boolean;
  readonly resolve: () => void;
  readonly reject: (e: Error) => void;
  readonly deadline: number;
  readonly timeoutMs: number;
  readonly what: string;
}

/** The waiters of one guest driver and the poll loop that serves them. */
export class GuestWaits {
  readonly #host: WaitHost;
  readonly #waiters = new Set<Waiter>();
  readonly #wakeFd = eventFd();
  #pollLoop: Promise<void> | null = null;
  #loopRunning = false;
  #polling = false;
  /** when the outstanding poll times out at the latest */
  #pollEnd = 0;
  #closed = false;

  constructor(host: WaitHost) {
    this.#host = host;
  }

  /** Whether `close()` was called. */
  get closed(): boolean {
    return this.#closed;
  }

  /** See `VsockGuest.waitFor`. */
  waitFor(pred: () => boolean, timeoutMs: number, what: string): Promise<void> {
    if (this.#closed) return Promise.reject(new GuestConnError("the guest driver is closed"));
    this.#host.pump();
    if (pred()) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      this.#waiters.add({
        pred,
        resolve,
        reject,
        deadline: Date.now() + timeoutMs,
        timeoutMs,
        what,
      });
      // #loopRunning is cleared synchronously when the loop exits, so a waiter added by a
      // continuation of the last resolved one always finds the loop running or starts one.
      if (!this.#loopRunning) {
        this.#loopRunning = true;
        this.#pollLoop = this.#runPollLoop();
      } else if (this.#polling && Date.now() + timeoutMs < this.#pollEnd) {
        eventFdWrite(this.#wakeFd); // recompute the slice for the earlier deadline
      }
    });
  }

  /** Ends the outstanding poll so the loop picks up a changed front end. */
  wake(): void {
    eventFdWrite(this.#wakeFd);
  }

  /**
   * The one poll loop: runs while anyone waits. `#loopRunning` is cleared in the same
   * synchronous step as the final "no waiters" check (no await in between), so a waiter added
   * by the continuation of the last resolved one always starts a new loop.
   */
  async #runPollLoop(): Promise<void> {
    try {
      while (this.#waiters.size > 0 && !this.#closed) {
        const fe = this.#host.frontEnd();
        const fds = [this.#wakeFd];
        const events = [POLLIN];
        const callIdx: number[] = [];
        if (!fe.closed) {
          for (let i = 0; i < VSOCK_VQ_COUNT; i++) {
            fds.push(fe.callFds[i]);
            events.push(POLLIN);
            callIdx.push(i);
          }
          fds.push(fe.socketFd);
          events.push(0);
        }
        let slice = POLL_SLICE_MS;
        const now = Date.now();
        for (const w of this.#waiters) slice = Math.min(slice, Math.max(0, w.deadline - now));
        this.#polling = true;
        this.#pollEnd = now + slice;
        let rev: number[];
        try {
          rev = await pollFdsAsync(fds, events, slice);
        } finally {
          this.#polling = false;
        }
        if (this.#closed) break;
        if (rev[0] & POLLIN) eventFdRead(this.#wakeFd);
        let hangup = false;
        let invalid = false;
        if (fe === this.#host.frontEnd() && !fe.closed) {
          for (let k = 0; k < callIdx.length; k++) {
            if (rev[1 + k] & POLLIN) this.#host.interrupts[callIdx[k]] += fe.takeCall(callIdx[k]);
          }
          const s = rev[fds.length - 1];
          if (s & (POLLHUP | POLLERR)) hangup = true;
          if (rev.some((x) => (x & POLLNVAL) !== 0)) invalid = true;
        }
        this.#host.pump();
        if (hangup || invalid) {
          const why = hangup
            ? "the back end closed the vhost-user connection"
            : "a polled fd is invalid (closed behind the driver's back)";
          for (const w of [...this.#waiters]) {
            this.#waiters.delete(w);
            w.reject(
              new GuestConnError(`while waiting for ${w.what}: ${why}\n${this.#host.describe()}`),
            );
          }
        }
        this.#expireWaiters();
      }
    } catch (e) {
      const err = e instanceof Error ? e : new Error(String(e));
      for (const w of [...this.#waiters]) {
        this.#waiters.delete(w);
        w.reject(err);
      }
    } finally {
      this.#loopRunning = false;
    }
  }

  /** Resolves every waiter whose predicate holds (called at the end of each pump). */
  settle(): void {
    if (this.#waiters.size === 0) return;
    for (const w of [...this.#waiters]) {
      let ok: boolean;
      try {
        ok = w.pred();
      } catch (e) {
        this.#waiters.delete(w);
        w.reject(e instanceof Error ? e : new Error(String(e)));
        continue;
      }
      if (ok) {
        this.#waiters.delete(w);
        w.resolve();
      }
    }
    // Nobody waits any more: end the outstanding poll promptly.
    if (this.#waiters.size === 0 && this.#polling) eventFdWrite(this.#wakeFd);
  }

  #expireWaiters(): void {
    const now = Date.now();
    for (const w of [...this.#waiters]) {
      if (now >= w.deadline) {
        this.#waiters.delete(w);
        w.reject(
          new GuestTimeoutError(
            `timed out after ${w.timeoutMs} ms waiting for ${w.what}\n${this.#host.describe()}`,
          ),
        );
      }
    }
  }

  /**
   * Pending waits reject, the poll loop finishes, the wake eventfd is closed. Resolves true
   * for the call that closed, false (after the loop ended) for later ones.
   */
  async close(): Promise<boolean> {
    if (this.#closed) {
      await this.#pollLoop;
      return false;
    }
    this.#closed = true;
    for (const w of [...this.#waiters]) {
      this.#waiters.delete(w);
      w.reject(new GuestConnError(`the guest driver was closed while waiting for ${w.what}`));
    }
    eventFdWrite(this.#wakeFd);
    await this.#pollLoop;
    closeFd(this.#wakeFd); // only after the poll using it returned
    return true;
  }
}
