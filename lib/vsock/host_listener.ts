/**
 * The host side of hybrid vsock (Firecracker's protocol, shared by
 * vhost-device-vsock): host applications reach the guest through one Unix
 * socket, `<uds_path>`.
 *
 * A host app connects to `<uds_path>` and writes `CONNECT <port>\n`. The line
 * may arrive in pieces; bytes sent right after it are kept and delivered to the
 * guest as the first data of the connection. Once the line is complete the
 * device asks the guest (REQUEST); the app gets `OK <host-port>\n` when the guest
 * accepts, or the socket is closed on refusal or timeout. A client that sends a
 * bad line, or no full line within the connect timeout, is closed with a log
 * line. The number of clients still in the handshake is capped.
 */
import { acceptRaw, close, EAGAIN, EPOLLIN, listenUnix, readRaw } from "../../ffi/mod.ts";
import { log } from "../log.ts";
import type { Reactor, Timer } from "../reactor.ts";
import { ConnectLineParser } from "./connect_line.ts";

/** Bytes read per read() while waiting for the CONNECT line (line + early data). */
const HANDSHAKE_READ = 4096;

/** What the device does with a completed CONNECT line. */
export type ConnectHandler = (fd: number, port: number, earlyData: Uint8Array | null) => void;

interface Handshake {
  fd: number;
  parser: ConnectLineParser;
  timer: Timer;
}

export class HostListener {
  #fd = -1;
  readonly #handshakes = new Map<number, Handshake>();
  readonly #buf = new Uint8Array(HANDSHAKE_READ);

  constructor(
    readonly reactor: Reactor,
    readonly path: string,
    readonly onConnect: ConnectHandler,
    readonly timeoutMs: number,
    readonly maxPending: number,
  ) {}

  listen(): void {
    this.#fd = listenUnix(this.path);
    this.reactor.addFd(this.#fd, EPOLLIN, () => this.#accept());
    log.info(`vsock: host apps connect through ${this.path} ("CONNECT <port>\\n")`);
  }

  get pendingCount(): number {
    return this.#handshakes.size;
  }

  #accept(): void {
    for (;;) {
      const fd = acceptRaw(this.#fd);
      if (fd === -EAGAIN) return;
      if (fd < 0) {
        log.warn(`vsock: accept on ${this.path} failed: errno ${-fd}`);
        return;
      }
      if (this.#handshakes.size >= this.maxPending) {
        log.warn(`vsock: too many host connections in handshake (${this.maxPending}); refused`);
        close(fd);
        continue;
      }
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
    log.info(`vsock: host client dropped: ${why}`);
    this.#release(hs);
    close(hs.fd);
  }

  close(): void {
    for (const hs of [...this.#handshakes.values()]) this.#drop(hs, "shutting down");
    if (this.#fd >= 0) {
      this.reactor.removeFd(this.#fd);
      close(this.#fd);
      this.#fd = -1;
      try {
        Deno.removeSync(this.path);
      } catch { /* gone */ }
    }
  }
}
