/**
 * Siblings across worker processes: the part of the sibling switch (`vsock/sibling_hub.ts`)
 * that reaches VMs served by other workers.
 *
 * Each pair of workers whose VMs share a group has a link: one memfd holding two
 * single-producer single-consumer rings (`sibling_ring.ts`), one per direction, that both
 * workers map. Every worker has one doorbell eventfd, registered in its reactor, that peers
 * write after putting a record in a ring towards it (only when it may be asleep).
 *
 * - Sending: a VM of another worker is a `RemoteSibling` registered in the local hub, so the
 *   muxer routes to it by CID exactly as to a local sibling; its `acceptFromSibling` writes
 *   the packet into the ring. A full ring (or a link that is down because the peer worker is
 *   restarting) refuses it: the sending device answers its guest with an RST.
 * - Receiving: on the doorbell, every inbound ring is drained in order into the local
 *   device's sibling inbox. When an inbox is full the record stays in the ring (order kept,
 *   back-pressure reaches the sender as a full ring) and the drain is retried by a timer.
 * - Restarts: the supervisor gives the restarted worker fresh links and sends its peers
 *   `link-down` when it dies and `link` (new memfd) when it is started again.
 */
import { close, eventFdRead, eventFdWrite, type Mapping, mapShared, unmap } from "../ffi/mod.ts";
import { EPOLLIN } from "../ffi/mod.ts";
import { log } from "./log.ts";
import type { Reactor, Timer } from "./reactor.ts";
import { ringBytes, SiblingRing } from "./sibling_ring.ts";
import type { SiblingEndpoint, SiblingHub, SiblingPacket } from "./vsock/sibling_hub.ts";
import type { LinkWiring, RemoteVm } from "./worker_plan.ts";

/** How soon a drain blocked by a full inbox is retried. */
const BLOCKED_RETRY_MS = 1;

/** One direction pair to a peer worker. */
class Link {
  readonly #mapping: Mapping;
  readonly out: SiblingRing;
  readonly in: SiblingRing;

  constructor(readonly wiring: LinkWiring) {
    const size = 2 * ringBytes(wiring.capacity);
    this.#mapping = mapShared(wiring.memfd, size);
    const buf = this.#mapping.bytes.buffer as ArrayBuffer;
    const mine = wiring.side * ringBytes(wiring.capacity);
    const theirs = (1 - wiring.side) * ringBytes(wiring.capacity);
    this.out = new SiblingRing(buf, mine, wiring.capacity, "producer");
    this.in = new SiblingRing(buf, theirs, wiring.capacity, "consumer");
  }

  send(p: SiblingPacket): boolean {
    const r = this.out.push(p);
    if (r === 2) eventFdWrite(this.wiring.peerBellFd);
    return r !== 0;
  }

  close(): void {
    unmap(this.#mapping);
    close(this.wiring.memfd);
    close(this.wiring.peerBellFd);
  }
}

/** A VM served by another worker, as the local hub sees it. */
export class RemoteSibling implements SiblingEndpoint {
  link: Link | null = null;
  constructor(
    readonly guestCid: number,
    readonly groups: readonly string[],
    readonly worker: number,
  ) {}

  acceptFromSibling(p: SiblingPacket): boolean {
    return this.link !== null && this.link.send(p);
  }
}

export class SiblingLinks {
  readonly #links = new Map<number, Link>();
  readonly #remotes: RemoteSibling[] = [];
  #retry: Timer | null = null;
  readonly #deliver = (p: SiblingPacket): boolean => {
    const to = this.hub.lookup(p.dstCid);
    // The VM left (or never was here): the packet has nowhere to go.
    if (to === undefined || to instanceof RemoteSibling) return true;
    return to.acceptFromSibling(p);
  };

  constructor(
    readonly reactor: Reactor,
    readonly hub: SiblingHub,
    readonly bellFd: number,
    remotes: readonly RemoteVm[],
    links: readonly LinkWiring[],
  ) {
    for (const r of remotes) {
      const s = new RemoteSibling(r.cid, r.groups, r.worker);
      this.#remotes.push(s);
      hub.register(s);
    }
    for (const l of links) this.attach(l);
    reactor.addFd(bellFd, EPOLLIN, () => {
      eventFdRead(bellFd);
      this.drain();
    });
    this.drain(); // records a peer wrote before this worker started
  }

  /** Uses a (new) link to `wiring.peer`, replacing the previous one. */
  attach(wiring: LinkWiring): void {
    this.down(wiring.peer);
    const link = new Link(wiring);
    this.#links.set(wiring.peer, link);
    for (const r of this.#remotes) if (r.worker === wiring.peer) r.link = link;
    this.drain();
  }

  /** The peer worker died: packets towards its VMs are refused until a new link comes. */
  down(peer: number): void {
    const old = this.#links.get(peer);
    if (old === undefined) return;
    this.#links.delete(peer);
    for (const r of this.#remotes) if (r.link === old) r.link = null;
    old.close();
  }

  /** Moves every waiting record into the local inboxes. */
  drain(): void {
    for (const [peer, link] of this.#links) {
      const r = link.in.drain(this.#deliver);
      if (r === "blocked" && this.#retry === null) {
        this.#retry = this.reactor.setTimer(BLOCKED_RETRY_MS, () => {
          this.#retry = null;
          this.drain();
        });
      } else if (r === "corrupt") {
        log.error(`siblings: corrupt record in the ring from worker ${peer}; link dropped`);
        this.down(peer);
      }
    }
  }

  close(): void {
    this.#retry?.cancel();
    this.reactor.removeFd(this.bellFd);
    for (const peer of [...this.#links.keys()]) this.down(peer);
    for (const r of this.#remotes) this.hub.unregister(r);
    close(this.bellFd);
  }
}
