/**
 * Receive-window autotuning for guest -> host traffic (credit, virtio 1.3 "Socket Device",
 * Buffer Space Management).
 *
 * The guest may have at most our advertised `buf_alloc` bytes in flight. At the default 64
 * KiB (vhost-device-vsock's and Firecracker's) a streaming guest sends one maximal packet and
 * then waits for a CREDIT_UPDATE: the window, not the host app, bounds the throughput. Like
 * TCP's receive-buffer autotuning, a connection whose host app keeps up while the guest fills
 * the window doubles the window it advertises (see `VsockConnection#autotune`), from
 * `--tx-buffer-size` up to AUTOTUNE_MAX_WINDOW.
 *
 * What a larger window costs is memory when the host app stops reading: the guest may then
 * park up to the window in our backlog. So growth is reserved against a budget per VM
 * (`--max-buffer-memory`, default AUTOTUNE_DEFAULT_BUDGET): past it, windows stay where they
 * are. With the defaults the worst case is the budget plus 1,023 x 64 KiB (64 MiB), whatever
 * the guest does. `--no-autotune` keeps every window at `--tx-buffer-size`.
 */

/** Largest window autotuning advertises (4 MiB). */
export const AUTOTUNE_MAX_WINDOW = 4 << 20;
/** Default budget for grown windows, per VM (256 MiB). */
export const AUTOTUNE_DEFAULT_BUDGET = 256 << 20;

export class WindowAutotune {
  #reserved = 0;

  constructor(
    /** bytes of window growth all connections of the VM may hold at once */
    readonly budget: number = AUTOTUNE_DEFAULT_BUDGET,
    readonly maxWindow: number = AUTOTUNE_MAX_WINDOW,
  ) {}

  /** Bytes of grown window held now. */
  get reserved(): number {
    return this.#reserved;
  }

  /** Reserves `n` more bytes of window; false (nothing reserved) past the budget. */
  reserve(n: number): boolean {
    if (this.#reserved + n > this.budget) return false;
    this.#reserved += n;
    return true;
  }

  /** A closing connection gives its growth back. */
  release(n: number): void {
    this.#reserved = Math.max(0, this.#reserved - n);
  }
}
