/**
 * The benchmark's control channel: JSON lines over a child process's stdin/stdout.
 *
 * The bench main process (async, `BenchChild`) sends `{"id": n, "cmd": name, ...params}`; the
 * child (sync, `serveCommands`) runs one command at a time and answers with any number of
 * `{"id": n, "ev": name, ...data}` progress events ("listening", "connected", ...) and finally
 * `{"id": n, "ok": true, "result": {...}}` or `{"id": n, "ok": false, "error": "..."}`. A child
 * may send unsolicited events with id 0 (e.g. "booted").
 *
 * Children read stdin with blocking `readSync`: between commands they sit in read(2), and
 * while a command runs they never touch the event loop except for immediately-resolved
 * promises. Every wait on the parent side has a timeout (`StallError`), so a stalled back end
 * ends the run with a message instead of a hang.
 */

/** A command message (parent -> child). */
export interface Command {
  readonly id: number;
  readonly cmd: string;
  readonly [key: string]: unknown;
}

/** Emits one progress event of a running command. */
export type EmitFn = (ev: string, data?: Record<string, unknown>) => void;

/** A command handler in a child; its result is sent as `result`. */
export type Handler = (
  msg: Command,
  emit: EmitFn,
) => Promise<Record<string, unknown>> | Record<string, unknown>;

const enc = new TextEncoder();

/** Writes one JSON line to stdout (blocking, complete). */
export function sendLine(obj: unknown): void {
  const b = enc.encode(JSON.stringify(obj) + "\n");
  let off = 0;
  while (off < b.length) off += Deno.stdout.writeSync(b.subarray(off));
}

/** Reads JSON lines from stdin with blocking reads. */
export class LineReader {
  readonly #buf = new Uint8Array(65536);
  readonly #dec = new TextDecoder();
  #text = "";

  /** The next message, or null at EOF. */
  next(): Command | null {
    for (;;) {
      const nl = this.#text.indexOf("\n");
      if (nl >= 0) {
        const line = this.#text.slice(0, nl).trim();
        this.#text = this.#text.slice(nl + 1);
        if (line === "") continue;
        return JSON.parse(line) as Command;
      }
      const n = Deno.stdin.readSync(this.#buf);
      if (n === null) return null;
      this.#text += this.#dec.decode(this.#buf.subarray(0, n), { stream: true });
    }
  }
}

/**
 * Child side: runs commands from stdin until EOF or the "exit" command. `onExit` runs before
 * returning (close sockets, stop the guest).
 */
export async function serveCommands(
  handlers: Record<string, Handler>,
  onExit: () => Promise<void> | void,
): Promise<void> {
  const input = new LineReader();
  for (;;) {
    const msg = input.next();
    if (msg === null || msg.cmd === "exit") break;
    const emit: EmitFn = (ev, data = {}) => sendLine({ ...data, id: msg.id, ev });
    const h = handlers[msg.cmd];
    try {
      if (h === undefined) throw new Error(`unknown command ${msg.cmd}`);
      const result = await h(msg, emit);
      sendLine({ id: msg.id, ok: true, result });
    } catch (e) {
      const error = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
      sendLine({ id: msg.id, ok: false, error });
    }
  }
  await onExit();
}

/** A wait in the parent ran out of time: something stalled. */
export class StallError extends Error {
  override name = "StallError";
}

/** A command failed in the child. */
export class ChildError extends Error {
  override name = "ChildError";
}

interface Message {
  id: number;
  ev?: string;
  ok?: boolean;
  result?: Record<string, unknown>;
  error?: string;
  [key: string]: unknown;
}

/** A command running in a child (parent side). */
export class Call {
  readonly #events: Message[] = [];
  readonly #eventWaiters: { name: string; resolve: (m: Message) => void }[] = [];
  #final: Message | null = null;
  #finalWaiters: ((m: Message) => void)[] = [];

  constructor(readonly child: BenchChild, readonly id: number, readonly cmd: string) {}

  /** @internal */
  _deliver(m: Message): void {
    if (m.ev !== undefined) {
      const i = this.#eventWaiters.findIndex((w) => w.name === m.ev);
      if (i >= 0) this.#eventWaiters.splice(i, 1)[0].resolve(m);
      else this.#events.push(m);
      return;
    }
    this.#final = m;
    for (const w of this.#finalWaiters.splice(0)) w(m);
    // Anyone waiting for an event that will never come learns through the final message.
    for (const w of this.#eventWaiters.splice(0)) w.resolve(m);
  }

  /** Waits for progress event `name` (rejects if the command ends first, or on timeout). */
  async event(name: string, timeoutMs: number): Promise<Record<string, unknown>> {
    const i = this.#events.findIndex((m) => m.ev === name);
    let m: Message;
    if (i >= 0) m = this.#events.splice(i, 1)[0];
    else if (this.#final !== null) m = this.#final;
    else {
      m = await this.child.withTimeout(
        new Promise<Message>((resolve) => this.#eventWaiters.push({ name, resolve })),
        timeoutMs,
        `"${name}" from ${this.child.name} (${this.cmd})`,
      );
    }
    if (m.ev === name) return m;
    if (m.ok === false) throw new ChildError(`${this.child.name} ${this.cmd}: ${m.error}`);
    throw new ChildError(`${this.child.name} ${this.cmd} ended before "${name}"`);
  }

  /** Waits for the result (rejects with ChildError on failure, StallError on timeout). */
  async done(timeoutMs: number): Promise<Record<string, unknown>> {
    const m = this.#final ?? await this.child.withTimeout(
      new Promise<Message>((resolve) => this.#finalWaiters.push(resolve)),
      timeoutMs,
      `the end of ${this.cmd} in ${this.child.name}`,
    );
    if (m.ok !== true) throw new ChildError(`${this.child.name} ${this.cmd}: ${m.error}`);
    return m.result ?? {};
  }
}

/** A benchmark child process (guest driver or host app) controlled over JSON lines. */
export class BenchChild {
  readonly #proc: Deno.ChildProcess;
  readonly #writer: WritableStreamDefaultWriter<Uint8Array>;
  readonly #calls = new Map<number, Call>();
  readonly #unsolicited: Message[] = [];
  #nextId = 1;
  #stderr = "";
  #exited = false;
  #exitWaiters: (() => void)[] = [];
  readonly status: Promise<Deno.CommandStatus>;
  readonly pid: number;

  private constructor(readonly name: string, proc: Deno.ChildProcess) {
    this.#proc = proc;
    this.pid = proc.pid;
    this.#writer = proc.stdin.getWriter();
    this.status = proc.status.then((s) => {
      this.#exited = true;
      for (const w of this.#exitWaiters.splice(0)) w();
      return s;
    });
    this.#readLines();
    this.#readStderr();
  }

  /** Spawns `deno run -A <script> ...args`. */
  static spawn(name: string, script: string, args: readonly string[]): BenchChild {
    const proc = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", script, ...args],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    return new BenchChild(name, proc);
  }

  /** Everything the child wrote to stderr. */
  get stderr(): string {
    return this.#stderr;
  }

  async #readLines(): Promise<void> {
    const dec = new TextDecoder();
    let text = "";
    for await (const chunk of this.#proc.stdout) {
      text += dec.decode(chunk, { stream: true });
      for (let nl = text.indexOf("\n"); nl >= 0; nl = text.indexOf("\n")) {
        const line = text.slice(0, nl);
        text = text.slice(nl + 1);
        if (line.trim() === "") continue;
        let m: Message;
        try {
          m = JSON.parse(line);
        } catch {
          this.#stderr += `[stdout] ${line}\n`;
          continue;
        }
        const call = this.#calls.get(m.id);
        if (call !== undefined) {
          call._deliver(m);
          if (m.ev === undefined) this.#calls.delete(m.id);
        } else {
          this.#unsolicited.push(m);
        }
      }
    }
  }

  async #readStderr(): Promise<void> {
    const dec = new TextDecoder();
    for await (const chunk of this.#proc.stderr) {
      this.#stderr += dec.decode(chunk, { stream: true });
    }
  }

  /** Starts command `cmd`. */
  call(cmd: string, params: Record<string, unknown> = {}): Call {
    const id = this.#nextId++;
    const c = new Call(this, id, cmd);
    this.#calls.set(id, c);
    const line = new TextEncoder().encode(JSON.stringify({ ...params, id, cmd }) + "\n");
    this.#writer.write(line).catch(() => {});
    return c;
  }

  /** Runs `cmd` to completion. */
  run(cmd: string, params: Record<string, unknown>, timeoutMs: number) {
    return this.call(cmd, params).done(timeoutMs);
  }

  /** Waits for an unsolicited event (id 0) named `ev`. */
  async unsolicited(ev: string, timeoutMs: number): Promise<Record<string, unknown>> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.#unsolicited.findIndex((m) => m.ev === ev);
      if (i >= 0) return this.#unsolicited.splice(i, 1)[0];
      if (this.#exited) {
        throw new ChildError(`${this.name} exited before "${ev}"\n${this.#stderr}`);
      }
      if (Date.now() >= deadline) {
        throw new StallError(
          `no "${ev}" from ${this.name} within ${timeoutMs} ms\n${this.#stderr}`,
        );
      }
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  /** Races `p` against a timeout and the child's exit. */
  async withTimeout<T>(p: Promise<T>, timeoutMs: number, what: string): Promise<T> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    let onExit: (() => void) | undefined;
    const stop = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () =>
          reject(
            new StallError(`timed out after ${timeoutMs} ms waiting for ${what}\n${this.#tail()}`),
          ),
        timeoutMs,
      );
      onExit = () =>
        reject(new ChildError(`${this.name} exited while waiting for ${what}\n${this.#tail()}`));
      if (this.#exited) onExit();
      else this.#exitWaiters.push(onExit);
    });
    try {
      return await Promise.race([p, stop]);
    } finally {
      clearTimeout(timer);
      const i = onExit === undefined ? -1 : this.#exitWaiters.indexOf(onExit);
      if (i >= 0) this.#exitWaiters.splice(i, 1);
    }
  }

  #tail(): string {
    const s = this.#stderr;
    return s.length > 4000 ? "..." + s.slice(-4000) : s;
  }

  /** Asks the child to exit; kills it after `graceMs`. */
  async close(graceMs = 5000): Promise<void> {
    if (!this.#exited) {
      try {
        await this.#writer.write(
          new TextEncoder().encode(JSON.stringify({ id: 0, cmd: "exit" }) + "\n"),
        );
        await this.#writer.close();
      } catch { /* gone */ }
      let timer: ReturnType<typeof setTimeout> | undefined;
      const t = new Promise<"timeout">((r) => timer = setTimeout(() => r("timeout"), graceMs));
      const first = await Promise.race([this.status, t]);
      clearTimeout(timer);
      if (first === "timeout") {
        try {
          this.#proc.kill("SIGKILL");
        } catch { /* gone */ }
      }
    }
    await this.status;
  }
}
