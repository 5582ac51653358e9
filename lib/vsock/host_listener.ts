/**
 * The host side of hybrid vsock (Firecracker's protocol, shared by vhost-device-vsock): host
 * applications reach the guest through one Unix socket, `<uds_path>`.
 *
 * A host app connects to `<uds_path>` and writes `CONNECT <port>\n` (a seqpacket app connects
 * a SOCK_SEQPACKET socket to `<uds_path>.seqpacket` and sends the line as its first message). The line may arrive in
 * pieces; bytes sent right after it are kept and delivered to the guest as the first data of
 * the connection. Once the line is complete the device asks the guest (REQUEST); the app gets
 * `OK <host-port>\n` when the guest accepts, or the socket is closed on refusal or timeout. A
 * client that sends a bad line, or no full line within the connect timeout, is closed.
 *
 * Hostile host apps are expected:
 * - accepting goes through `Acceptor` (lib/acceptor.ts): when the process runs out of fds it
 *   pauses accepts instead of spinning on the level-triggered listening fd;
 * - clients still in the handshake are bounded by MAX_PENDING_HANDSHAKES, apart from the
 *   connection limit. When the bound is reached the OLDEST pending client is closed to make
 *   room (as SYN-flood defences drop the oldest half-open connection), not the newest: a
 *   client that connects and keeps quiet can no longer lock out well-formed CONNECTs, which
 *   complete within a reactor batch or two of their accept;
 * - every log line a client can trigger goes through a LogLimiter.
 */
import { close, EAGAIN, EPOLLIN, listenUnix, readRaw, SOCK_STREAM } from "../../ffi/mod.ts";
import { Acceptor, MAX_ACCEPTS_PER_WAKEUP } from "../acceptor.ts";
import { log, LogLimiter } from "../log.ts";
import type { Reactor, Timer } from "../reactor.ts";
import { ConnectLineParser } from "./connect_line.ts";

/** Bytes read per read() while waiting for the CONNECT line (line + early data). */
const HANDSHAKE_READ = 4096;

/**
 * Most host clients in the CONNECT handshake at once (accepted, line not complete yet). Each
 * costs one fd and a timer. At 4 x MAX_ACCEPTS_PER_WAKEUP, a client whose line is already
 * in its socket when it is accepted survives the next three accept batches of a connect
 * storm, and its line is read in the first of them.
 */
export const MAX_PENDING_HANDSHAKES = 4 * MAX_ACCEPTS_PER_WAKEUP;

/**
 * What the device does with a completed CONNECT line: `earlyData` is what followed the line
 * (for a seqpacket client: the rest of the line's message, or null).
 */
export type ConnectHandler = (fd: number, port: number, earlyData: Uint8Array | null) => void;

interface Handshake {
  fd: number;
  parser: ConnectLineParser;
  timer: Timer;
}

export class HostListener {
  #fd = -1;
  #acceptor: Acceptor | null = null;
  /** pending handshakes by fd, oldest first (a Map iterates in insertion order) */
  readonly #handshakes = new Map<number, Handshake>();
  readonly #buf = new Uint8Array(HANDSHAKE_READ);
  readonly #dropLog = new LogLimiter(
    "vsock: host clients dropped in the handshake",
    10,
    5000,
    "info",
  );
  readonly #evictLog = new LogLimiter("vsock: pending host handshakes evicted", 1, 5000);
  /** evictions since the last eviction log line */
  #evicted = 0;

  constructor(
    readonly reactor: Reactor,
    readonly path: string,
    readonly onConnect: ConnectHandler,
    readonly timeoutMs: number,
    /** SOCK_STREAM (`<uds_path>`) or SOCK_SEQPACKET (`<uds_path>.seqpacket`) */
    readonly socketType: number = SOCK_STREAM,
  ) {}

  listen(): void {
    this.#fd = listenUnix(this.path, { type: this.socketType });
    this.#acceptor = new Acceptor(
      this.reactor,
      this.#fd,
      `vsock: host apps on ${this.path}`,
      (fd) => this.#adopt(fd),
    );
    this.#acceptor.start();
    log.info(`vsock: host apps connect through ${this.path} ("CONNECT <port>\\n")`);
  }

  get pendingCount(): number {
    return this.#handshakes.size;
  }

  #adopt(fd: number): void {
    if (this.#handshakes.size >= MAX_PENDING_HANDSHAKES) this.#evictOldest();
    const hs: Handshake = {
      fd,
      parser: new ConnectLineParser(),
      timer: this.reactor.setTimer(
        this.timeoutMs,
        () => this.#drop(hs, "no CONNECT line in time"),
      ),
    };
    this.#handshakes.set(fd, hs);
    this.reactor.addFd(fd, EPOLLIN, () => this.#read(hs));
  }

  /** Closes the client that has waited longest in the handshake. */
  #evictOldest(): void {
    const oldest = this.#handshakes.values().next().value;
    if (oldest === undefined) return;
    this.#release(oldest);
    close(oldest.fd);
    this.#evicted++;
    if (this.#evictLog.allow()) {
      log.warn(
        `vsock: ${MAX_PENDING_HANDSHAKES} host clients in the CONNECT handshake on ${this.path}; ` +
          `closing the oldest to admit new ones (${this.#evicted} so far)`,
      );
    }
  }

  #read(hs: Handshake): void {
    for (;;) {
      const n = readRaw(hs.fd, this.#buf);
      if (n === -EAGAIN) return;
      if (n <= 0) return this.#drop(hs, n === 0 ? "closed before CONNECT" : `read errno ${-n}`);
      const r = hs.parser.feed(this.#buf.subarray(0, n));
      if (r.state === "need-more") continue;
      if (r.state === "error") return this.#drop(hs, `bad CONNECT line: ${r.reason}`);
      this.#release(hs);
      this.onConnect(hs.fd, r.port, r.rest.length > 0 ? r.rest.slice() : null);
      return;
    }
  }

  /** Stops watching the handshake; the fd now belongs to someone else. */
  #release(hs: Handshake): void {
    hs.timer.cancel();
    this.reactor.removeFd(hs.fd);
    this.#handshakes.delete(hs.fd);
  }

  #drop(hs: Handshake, why: string): void {
    if (this.#dropLog.allow()) log.info(`vsock: host client dropped: ${why}`);
    this.#release(hs);
    close(hs.fd);
  }

  close(): void {
    for (const hs of [...this.#handshakes.values()]) {
      this.#release(hs);
      close(hs.fd);
    }
    this.#acceptor?.stop();
    this.#acceptor = null;
    if (this.#fd >= 0) {
      close(this.#fd);
      this.#fd = -1;
      try {
        Deno.removeSync(this.path);
      } catch { /* gone */ }
    }
  }
}
