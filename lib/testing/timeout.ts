/**
 * Time bounds for tests. `deno test` has no per-test timeout: a test whose promise never
 * settles holds the run forever, and one stuck in a synchronous loop holds it at 100% CPU.
 *
 * - `withTimeout(ms, fn)` wraps an async test body: it rejects with `TestTimeoutError` after
 *   `ms`, so a hung wait fails its own test (with the elapsed time) instead of the module.
 *   It cannot stop synchronous code; only a bound around the whole process does that (run
 *   `deno test` under `timeout --signal=INT`, which makes deno report the pending tests).
 * - `PROPERTY_TIME_LIMIT` is the fast-check option set every property test passes: the run
 *   stops between two runs once the limit is reached and counts as a failure.
 */

/** A test body did not finish within its bound. */
export class TestTimeoutError extends Error {
  override name = "TestTimeoutError";
}

/**
 * Returns a test function running `fn` with a bound of `ms` milliseconds: the test fails with
 * `TestTimeoutError` when `fn` has not settled by then (`fn` itself is not cancelled; give it
 * an AbortSignal-aware body, or let its own waits time out, to stop its work too). The signal
 * passed to `fn` aborts at the deadline.
 */
export function withTimeout<T extends unknown[]>(
  ms: number,
  fn: (...args: [...T, AbortSignal]) => Promise<void> | void,
): (...args: T) => Promise<void> {
  return async (...args: T) => {
    const ac = new AbortController();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const started = performance.now();
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        const err = new TestTimeoutError(`test did not finish within ${ms} ms`);
        ac.abort(err);
        reject(err);
      }, ms);
    });
    const body = Promise.resolve().then(() => fn(...args, ac.signal));
    try {
      await Promise.race([body, deadline]);
    } catch (e) {
      if (e instanceof TestTimeoutError) {
        body.catch(() => {}); // whatever it does later is no longer this test's result
        e.message += ` (elapsed ${Math.round(performance.now() - started)} ms)`;
      }
      throw e;
    } finally {
      clearTimeout(timer);
    }
  };
}

/**
 * fast-check parameters bounding a property run in time (pass with `numRuns`): the run is
 * interrupted between two runs after 30 s and reported as a failure.
 */
export const PROPERTY_TIME_LIMIT = {
  interruptAfterTimeLimit: 30_000,
  markInterruptAsFailure: true,
} as const;
