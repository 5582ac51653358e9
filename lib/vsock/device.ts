/**
 * The virtio-vsock device (virtio 1.3 "Socket Device", device id 19) on top of the
 * vhost-user back end: its queues, config space, event queue and saved state. Routing and
 * connections live in the muxer (`muxer.ts`) and the connection state machine
 * (`connection.ts`).
 *
 * Queues: 0 rx (device -> driver), 1 tx (driver -> device), 2 event. Config space:
 * le64 guest_cid.
 *
 * TX, on every tx kick: pop chains and hand each packet to the muxer; every chain is
 * returned with used len 0. TX keeps being processed while RX is full, up to a bounded
 * backlog of owed replies (then TX waits for RX). Payloads gathered for one writev are
 * written before the chains are published.
 *
 * RX: while the muxer owes the guest packets, pop a buffer and let the muxer fill it. When
 * the guest has no buffers the device enables notifications and re-checks the ring before
 * sleeping ("enable notification, then re-check": a buffer posted in between would never
 * be kicked).
 *
 * Work that arrives while the rings are not active (suspend, before the driver is up) is
 * kept and processed when they become active ("kick after start"). Used-ring updates and
 * call notifications are batched per reactor batch.
 *
 * Snapshot/restore: after a load a TRANSPORT_RESET event is owed. When the front end handed
 * us the event queue (crosvm) we send it as soon as the queue is active, and hold host and
 * sibling traffic until the driver re-reads its config after the event; when the VMM keeps
 * the event queue (QEMU) it sends the event itself and nothing is held (see docs/snapshot.md).
 */
import { log, LogLimiter } from "../log.ts";
import type { Reactor } from "../reactor.ts";
import { DescChain } from "../virtio/desc_chain.ts";
import {
  featureMask,
  VIRTIO_F_NOTIFY_ON_EMPTY_MASK,
  VIRTIO_F_RING_PACKED_MASK,
  VIRTIO_F_VERSION_1_MASK,
  VIRTIO_RING_F_EVENT_IDX_MASK,
  VIRTIO_RING_F_INDIRECT_DESC_MASK,
} from "../virtio/features.ts";
import { POP_EMPTY, POP_INVALID, type VirtQueue } from "../virtio/virtqueue.ts";
import type {
  ActiveQueue,
  QueueNotifier,
  ResetReason,
  VirtioDevice,
} from "../vhost_user/device.ts";
import { VhostUserProtocolFeatureMask as PF } from "../vhost_user/protocol.ts";
import {
  VIRTIO_VSOCK_CONFIG_SIZE,
  VIRTIO_VSOCK_EVENT_SIZE,
  VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
  VIRTIO_VSOCK_F_DGRAM,
  VIRTIO_VSOCK_F_SEQPACKET,
  VIRTIO_VSOCK_F_STREAM,
  VIRTIO_VSOCK_HDR_SIZE,
  VSOCK_VQ_EVENT,
  VSOCK_VQ_RX,
  VSOCK_VQ_TX,
  writeVsockConfig,
} from "./constants.ts";
import { type VsockDeviceOptions, VsockMuxer } from "./muxer.ts";
import { RestoreGate } from "./restore.ts";
import { RxBatch } from "./rx_batch.ts";
import { type DeviceStats, newDeviceStats } from "./stats.ts";

export type { DeviceStats } from "./stats.ts";
export type { VsockDeviceOptions } from "./muxer.ts";

/** Chains handled per queue visit before yielding to other fds. */
const MAX_CHAINS_PER_VISIT = 1024;
/**
 * Rx buffer bytes one visit fills before the reactor goes round once more, without sleeping,
 * and comes back: a host socket that became readable meanwhile (an interactive connection's
 * next message, a new datagram source) is then seen after at most this much bulk work (about
 * 32 of Linux's 4 KiB buffers, 30-60 us), where a visit over a whole ring of bulk data took up
 * to a millisecond and more. With 4 bulk streams that was most of an interactive round trip:
 * in the benchmark's fairness figure its p50 went from about 0.5 ms to 0.1-0.2 ms and its p99
 * under bulk and a datagram flood from 1.8-2.2 ms to 0.9-1 ms (docs/performance.md).
 */
export const RX_VISIT_BYTES = 128 * 1024;
/**
 * Rx chains filled between two publications of the used ring within one visit: the driver
 * can take the first packets while the device is still filling the rest. A sparse flow's
 * packet (an interactive flow's message goes first, rx_scheduler.ts) is published at once.
 * With EVENT_IDX a publication interrupts the driver only when it asked to be (used_event).
 */
const RX_PUBLISH_CHAINS = 32;

export class VsockDevice implements VirtioDevice {
  readonly name: string;
  readonly maxQueues = 3;
  readonly maxQueueSize: number;
  readonly features: bigint;
  readonly protocolFeatures: bigint = PF.CONFIG | PF.DEVICE_STATE;
  readonly stats: DeviceStats = newDeviceStats();
  readonly muxer: VsockMuxer;

  #reactor!: Reactor;
  #rx: ActiveQueue | null = null;
  #tx: ActiveQueue | null = null;
  #evt: ActiveQueue | null = null;
  readonly #rxChain: DescChain;
  readonly #txChain: DescChain;
  /** extra rx chains for multi-buffer reads */
  readonly #batch: RxBatch;
  #rxNeedsRun = false;
  #txNeedsRun = false;
  #rxSignal = false;
  #txSignal = false;
  /** queues already reported broken */
  readonly #brokenReported = new WeakSet<VirtQueue>();
  readonly #badChainLog = new LogLimiter("vsock: invalid descriptor chains");
  readonly #brokenLog = new LogLimiter("vsock: broken queues", 5, 5000, "error");
  /** TX stopped because too many replies are owed; RX draining resumes it */
  #txBlocked = false;
  #ackedFeatures = 0n;
  /** saved state, and what is owed and held after a load */
  readonly restore: RestoreGate;

  constructor(readonly options: VsockDeviceOptions) {
    this.name = `vsock(cid ${options.guestCid})`;
    // Streams and seqpacket always; datagrams (not in the virtio spec) only when asked for.
    // Split or packed rings (VIRTIO_F_RING_PACKED: QEMU's `packed=on`), as the driver acks.
    this.features = VIRTIO_F_VERSION_1_MASK | VIRTIO_RING_F_EVENT_IDX_MASK |
      VIRTIO_RING_F_INDIRECT_DESC_MASK | VIRTIO_F_NOTIFY_ON_EMPTY_MASK | VIRTIO_F_RING_PACKED_MASK |
      featureMask(VIRTIO_VSOCK_F_STREAM) | featureMask(VIRTIO_VSOCK_F_SEQPACKET) |
      (options.datagrams ? featureMask(VIRTIO_VSOCK_F_DGRAM) : 0n);
    this.maxQueueSize = options.queueSize;
    this.#rxChain = new DescChain(Math.max(options.queueSize, 1024) * 2);
    this.#txChain = new DescChain(Math.max(options.queueSize, 1024) * 2);
    this.#batch = new RxBatch(64);
    const requestRx = () => {
      this.#rxNeedsRun = true;
    };
    this.muxer = new VsockMuxer(options, this.stats, requestRx);
    this.restore = new RestoreGate(this.muxer, options.guestCid, requestRx);
  }

  get guestCid(): number {
    return this.options.guestCid;
  }

  get connectionCount(): number {
    return this.muxer.connectionCount;
  }

  /** guest ports host apps reached (listeners the driver keeps across a transport reset) */
  get guestListenerPorts(): Set<number> {
    return this.muxer.guestListenerPorts;
  }

  attach(reactor: Reactor): void {
    this.#reactor = reactor;
    reactor.onBatchEnd(() => this.#onBatchEnd());
    this.muxer.attach(reactor);
  }

  setFeatures(acked: bigint): void {
    this.#ackedFeatures = acked;
    this.muxer.dgramAcked = (acked & featureMask(VIRTIO_VSOCK_F_DGRAM)) !== 0n;
  }

  readConfig(offset: number, size: number): Uint8Array | null {
    if (offset < 0 || size < 0 || offset + size > VIRTIO_VSOCK_CONFIG_SIZE) return null;
    const cfg = new Uint8Array(VIRTIO_VSOCK_CONFIG_SIZE);
    writeVsockConfig(new DataView(cfg.buffer), 0, this.options.guestCid);
    this.restore.configRead();
    return cfg.slice(offset, offset + size);
  }

  queueActive(q: ActiveQueue): void {
    if (q.index === VSOCK_VQ_RX) {
      this.#rx = q;
      this.restore.rxActive(this.#reactor);
    } else if (q.index === VSOCK_VQ_TX) this.#tx = q;
    else if (q.index === VSOCK_VQ_EVENT) this.#evt = q;
  }

  queueInactive(index: number): void {
    if (index === VSOCK_VQ_RX) this.#flush(this.#rx), this.#rx = null;
    else if (index === VSOCK_VQ_TX) this.#flush(this.#tx), this.#tx = null;
    else if (index === VSOCK_VQ_EVENT) this.#flush(this.#evt), this.#evt = null;
  }

  queueConfigured(index: number): void {
    if (index === VSOCK_VQ_EVENT && !this.restore.eventQueueOwned) {
      this.restore.eventQueueOwned = true;
      log.debug("vsock: the front end hands us the event queue");
    }
  }

  queueKicked(index: number): void {
    if (index === VSOCK_VQ_TX) this.#processTx();
    else if (index === VSOCK_VQ_RX) this.#processRx();
    else if (index === VSOCK_VQ_EVENT) this.#sendTransportReset();
  }

  reset(reason: ResetReason): void {
    const n = this.muxer.reset();
    this.#rx = this.#tx = this.#evt = null;
    this.#ackedFeatures = 0n;
    this.restore.reset(reason === "driver-reset");
    if (reason !== "driver-reset") this.guestListenerPorts.clear();
    if (n > 0) log.info(`vsock: device reset (${reason}): closed ${n} host connections`);
  }

  dispose(): void {
    this.reset("front-end-disconnected");
    this.muxer.dispose();
  }

  // --- batching and notifications -----------------------------------------------------------

  #onBatchEnd(): void {
    if (this.#txNeedsRun) this.#processTx();
    if (this.#rxNeedsRun) this.#processRx();
    this.#signal();
  }

  #signal(): void {
    if (this.#rxSignal && this.#rx !== null) {
      this.#rxSignal = false;
      this.#publish(this.#rx.queue, this.#rx.notifier);
    }
    if (this.#txSignal && this.#tx !== null) {
      this.#txSignal = false;
      this.#publish(this.#tx.queue, this.#tx.notifier);
    }
  }

  #publish(q: VirtQueue, n: QueueNotifier): void {
    q.publishUsed();
    if (q.needsNotification()) n.notify();
  }

  #flush(q: ActiveQueue | null): void {
    if (q === null) return;
    this.#publish(q.queue, q.notifier);
  }

  // --- TX: guest -> host ---------------------------------------------------------------------

  #processTx(): void {
    this.#txNeedsRun = false;
    const tx = this.#tx;
    if (tx === null) return;
    const q = tx.queue;
    const chain = this.#txChain;
    let handled = 0;
    for (;;) {
      if (this.muxer.scheduler.orphansFull) {
        // Back-pressure: the guest is not taking replies; resume when RX drains.
        this.#txBlocked = true;
        break;
      }
      if (handled >= MAX_CHAINS_PER_VISIT) {
        this.#txNeedsRun = true;
        this.#reactor.again();
        break;
      }
      const r = q.popOrArm(chain); // empty: notifications re-armed and re-checked
      if (r === POP_EMPTY) break;
      handled++;
      if (r === POP_INVALID) {
        this.#badChain(q, chain.head, "tx", q.lastError);
        this.#txSignal = true;
        continue;
      }
      if (chain.readableLen < VIRTIO_VSOCK_HDR_SIZE) {
        this.stats.badChains++;
        if (this.#badChainLog.allow()) {
          log.warn(`vsock: tx chain shorter than a header (${chain.readableLen} bytes); dropped`);
        }
      } else {
        this.muxer.txPacket(chain);
      }
      q.pushUsed(chain.head, 0);
      this.#txSignal = true;
    }
    this.muxer.gather.flush();
    this.#reportBroken(q, "tx");
  }

  /** Logs once per queue that the guest corrupted it (it then yields nothing until reset). */
  #reportBroken(q: VirtQueue, which: string): void {
    if (q.broken === null || this.#brokenReported.has(q)) return;
    this.#brokenReported.add(q);
    // A front end rebuilds rings at will (each rebuild is a new queue): limit the rate too.
    if (this.#brokenLog.allow()) log.error(`vsock: ${which} queue broken: ${q.broken}`);
  }

  /** Returns an invalid chain with used len 0; the caller publishes it (`#txSignal` etc.). */
  #badChain(q: VirtQueue, head: number, which: string, why: string): void {
    this.stats.badChains++;
    if (this.#badChainLog.allow()) {
      log.warn(`vsock: invalid ${which} descriptor chain (head ${head}): ${why}`);
    }
    q.pushUsed(head, 0);
  }

  // --- RX: host -> guest ---------------------------------------------------------------------

  #processRx(): void {
    this.#rxNeedsRun = false;
    const rx = this.#rx;
    if (rx === null) return;
    if (!this.restore.activated) return;
    const q = rx.queue;
    const chain = this.#rxChain;
    const muxer = this.muxer;
    let produced = 0;
    let producedBytes = 0;
    let unpublished = 0;
    while (muxer.hasRxWork()) {
      if (produced >= MAX_CHAINS_PER_VISIT || producedBytes >= RX_VISIT_BYTES) {
        this.#rxNeedsRun = true;
        this.#reactor.again();
        break;
      }
      const r = q.popOrArm(chain); // empty: notifications re-armed and re-checked
      if (r === POP_EMPTY) break;
      if (r === POP_INVALID) {
        this.#badChain(q, chain.head, "rx", q.lastError);
        this.#rxSignal = true;
        continue;
      }
      if (chain.writableLen < VIRTIO_VSOCK_HDR_SIZE || chain.readableCount !== 0) {
        this.#badChain(q, chain.head, "rx", `buffer of ${chain.writableLen} writable bytes`);
        this.#rxSignal = true;
        continue;
      }
      this.#batch.begin(q);
      muxer.rxChains = this.#batch;
      const len = muxer.fillRx(chain);
      muxer.rxChains = null;
      if (len < 0) {
        // Nobody could use this buffer after all (no data on the socket yet): give it
        // back to the avail ring; connections still owing packets stay queued.
        q.unpop();
        break;
      }
      q.pushUsed(chain.head, len);
      const more = this.#batch.flushUsed(); // chains filled by the same read, in ring order
      this.#rxSignal = true;
      this.stats.rxPackets += 1 + more;
      produced += 1 + more;
      producedBytes += (1 + more) * chain.writableLen; // the buffers' size, as the scheduler counts
      unpublished += 1 + more;
      if (unpublished >= RX_PUBLISH_CHAINS || muxer.scheduler.servedSparse) {
        unpublished = 0;
        this.#publish(q, rx.notifier);
        // A long rx visit (up to a ring's worth of bulk data) must not hold up what the
        // driver sent meanwhile, such as an interactive flow's reply: take the tx ring now.
        const tx = this.#tx;
        if (tx !== null && !this.#txBlocked && !tx.queue.isEmpty()) {
          this.#processTx();
          this.#signal();
        }
      }
    }
    muxer.scheduler.compact();
    this.#reportBroken(q, "rx");
    // Replies drained: a TX backlog may proceed (on the next batch).
    if (this.#txBlocked && !muxer.scheduler.orphansFull) {
      this.#txBlocked = false;
      this.#txNeedsRun = true;
      this.#reactor.again();
    }
  }

  // --- event queue / activation (snapshot restore) ---------------------------------------------

  saveState(): Uint8Array {
    return this.restore.save(this.#ackedFeatures);
  }

  /** Loads a saved state (rings stopped): see `restore.ts`. */
  loadState(bytes: Uint8Array): void {
    this.restore.load(bytes);
  }

  /** Sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET if one is owed and the event queue is ours. */
  #sendTransportReset(): void {
    const evt = this.#evt;
    if (!this.restore.transportResetPending || evt === null) return;
    const q = evt.queue;
    const chain = this.#rxChain;
    // Empty: notifications re-armed and re-checked, so an event buffer posted meanwhile is
    // used now, and a later one comes with a kick.
    const r = q.popOrArm(chain);
    if (r === POP_EMPTY) return;
    if (r === POP_INVALID || chain.writableLen < VIRTIO_VSOCK_EVENT_SIZE) {
      this.#badChain(q, chain.head, "event", q.lastError || "event buffer too small");
      this.#publish(q, evt.notifier);
      return;
    }
    const ev = new Uint8Array(VIRTIO_VSOCK_EVENT_SIZE);
    new DataView(ev.buffer).setUint32(0, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, true);
    chain.writeFrom(ev, 0);
    q.pushUsed(chain.head, VIRTIO_VSOCK_EVENT_SIZE);
    this.#publish(q, evt.notifier);
    this.restore.resetDelivered();
  }
}
