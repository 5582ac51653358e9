/**
 * Snapshot/restore of the vsock device: the saved state, and what happens after a load.
 *
 * A loaded state cannot carry connections: the driver drops its own when it handles the
 * TRANSPORT_RESET event the load makes owed (virtio 1.3 "Socket Device", Device Events), so
 * ours are closed on the host side too; listeners survive.
 *
 * Who delivers TRANSPORT_RESET decides what the back end can see:
 * - The event queue is ours (crosvm hands it over): the device sends the event as soon as
 *   the queue is active, and host and sibling traffic is held until the driver re-reads its
 *   config *after* the event was delivered (a read before it is the driver's stale one).
 * - The VMM keeps the event queue (QEMU): it injects the event itself and answers config
 *   reads from its cache, so nothing the driver does about the reset is visible here and
 *   nothing is held. A connection made around the restore can then be accepted by the
 *   driver just before it handles the reset and silently dropped by it: the host app would
 *   hold an `OK` for a connection nobody serves. So every connection opened in that window
 *   is confirmed once the reset has certainly been handled (RESET_CONFIRM_DELAY_MS after
 *   the rings run again): it gets a CREDIT_REQUEST, which a live guest socket answers with
 *   a CREDIT_UPDATE and a dropped one with an RST, and the RST closes the host socket.
 */
import { log } from "../log.ts";
import type { Reactor, Timer } from "../reactor.ts";
import { decodeSnapshot, encodeSnapshot } from "../snapshot/format.ts";
import type { VsockMuxer } from "./muxer.ts";

/**
 * How long after the rings restart a VMM-injected TRANSPORT_RESET is taken as handled by
 * the driver (QEMU injects it 1 ns of guest time after the VM resumes; Linux handles it in
 * a work item within milliseconds).
 */
export const RESET_CONFIRM_DELAY_MS = 500;

export class RestoreGate {
  /** a transport reset event is owed to the driver (after a state load) */
  transportResetPending = false;
  /** host/sibling traffic flows (false: held until the driver has re-read the config) */
  activated = true;
  /** the front end configured the event queue: we deliver TRANSPORT_RESET ourselves */
  eventQueueOwned = false;
  /** after a load with a VMM-owned event queue: connections opened now must be confirmed */
  #confirming = false;
  #confirmTimer: Timer | null = null;

  constructor(
    readonly muxer: VsockMuxer,
    readonly guestCid: number,
    /** asks the device to run its rx loop */
    readonly requestRx: () => void,
  ) {}

  /**
   * The driver read the config space while traffic is held. When we own the event queue, a
   * read before the TRANSPORT_RESET event was delivered is the driver's stale pre-snapshot
   * read (the race rust-vmm's PR admitted): it does not count. The read that follows the
   * event is the driver re-reading its CID after dropping its connections: traffic may flow.
   */
  configRead(): void {
    if (this.activated) return;
    if (this.eventQueueOwned && this.transportResetPending) {
      log.info("vsock: config read before the transport reset was delivered; traffic still held");
      return;
    }
    this.activated = true;
    log.info("vsock: the driver re-read the config after the restore; host traffic flows");
    this.requestRx();
  }

  /** The rx queue runs again: after a VMM-owned load, confirm the window's connections soon. */
  rxActive(reactor: Reactor): void {
    if (!this.#confirming || this.#confirmTimer !== null) return;
    this.#confirmTimer = reactor.setTimer(RESET_CONFIRM_DELAY_MS, () => {
      this.#confirmTimer = null;
      this.#confirming = false;
      const n = this.muxer.confirmWindow();
      if (n > 0) log.info(`vsock: confirming ${n} connections opened around the restore`);
    });
  }

  save(ackedFeatures: bigint): Uint8Array {
    return encodeSnapshot({
      guestCid: this.guestCid,
      features: ackedFeatures.toString(16),
      guestListenerPorts: [...this.muxer.guestListenerPorts],
      connections: this.muxer.savedConnections(),
      transportResetPending: this.transportResetPending,
      activated: this.activated,
      eventQueueOwned: this.eventQueueOwned,
      savedAt: new Date().toISOString(),
    });
  }

  /** Loads a saved state (rings stopped); throws with a clear message on bad input. */
  load(bytes: Uint8Array): void {
    const s = decodeSnapshot(bytes);
    // Connections the guest knew are gone after its reset; host connects still waiting to be
    // offered to the guest (REQUEST not sent yet) are kept.
    const open = this.muxer.closeForLoad();
    if (s.guestCid !== this.guestCid) {
      log.info(`vsock: restored state was CID ${s.guestCid}; this device is CID ${this.guestCid}`);
    }
    for (const p of s.guestListenerPorts) this.muxer.guestListenerPorts.add(p);
    this.transportResetPending = true;
    // A VMM that keeps the event queue sends TRANSPORT_RESET itself and answers the driver's
    // config reads from its own cache: holding traffic would hold it forever. Hold only when
    // the event queue is ours; otherwise confirm what is opened around the reset.
    this.activated = s.eventQueueOwned === false;
    if (this.activated) {
      this.#confirming = true;
      this.muxer.openConfirmWindow();
    }
    log.info(
      `vsock: state loaded (saved ${s.savedAt}, ${s.connections.length} connections then, ` +
        `${open} host connections closed now); TRANSPORT_RESET owed, host traffic ` +
        (this.activated
          ? "flows (the VMM keeps the event queue; new connections are confirmed after it)"
          : "held until the config is re-read"),
    );
  }

  /** The TRANSPORT_RESET event went into the event queue. */
  resetDelivered(): void {
    this.transportResetPending = false;
    log.info(
      "vsock: TRANSPORT_RESET event sent to the driver; waiting for it to re-read the config",
    );
  }

  /** Device reset: nothing owed, nothing held. */
  reset(keepEventQueue: boolean): void {
    this.transportResetPending = false;
    this.activated = true;
    this.#confirming = false;
    this.#confirmTimer?.cancel();
    this.#confirmTimer = null;
    if (!keepEventQueue) this.eventQueueOwned = false;
  }
}
