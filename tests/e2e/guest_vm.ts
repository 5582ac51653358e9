/**
 * Real-guest end-to-end harness: a tiny Linux guest under QEMU (TCG, 1 vCPU), optionally with
 * a `vhost-user-vsock-pci` device whose vhost-user back end is the daemon under test.
 *
 * The guest (built by `build_initramfs.sh`: kernel, busybox, socat, the virtio-pci and vsock
 * modules) prints a ready marker on the serial console and runs an interactive shell there
 * with tty echo off and empty prompts. The host drives that shell through QEMU's stdio:
 *
 *   printf '%s-%s\n' E2E-BEGIN <id>; (eval '<command, quoted>') </dev/null
 *   printf '\n%s-%s:%d\n' E2E-END <id> $?
 *
 * The markers are assembled by printf, so the command text itself never contains them (even
 * if echo were on); the output is exactly what lies between them, with CRs removed.
 *
 * vhost-user needs the guest memory shareable with the back end: with `vhostSocket`, memory is
 * a `memory-backend-memfd` (share=on) bound to the NUMA node, and QEMU connects to the socket
 * as a client (the back end must listen first). The guest CID comes from the back end's
 * config space (GET_CONFIG), not from QEMU.
 */

const HERE = new URL(".", import.meta.url).pathname;
const REPO_ROOT = new URL("../../", import.meta.url).pathname;

/** Printed by the guest /init once the modules are loaded and the shell is about to start. */
export const GUEST_READY_MARKER = "E2E-GUEST-READY";
/** Printed by /init if modprobe failed for a module it loads at boot. */
const GUEST_MODPROBE_FAILED = "E2E-GUEST-MODPROBE-FAILED";
const BEGIN_TAG = "E2E-BEGIN";
const END_TAG = "E2E-END";
/** The guest tty is canonical: a line longer than N_TTY_BUF_SIZE (4096) is cut. */
const MAX_LINE_BYTES = 4000;
/** How much of the console the failure messages quote. */
const CONSOLE_TAIL_CHARS = 4000;
/** ^C: the guest tty turns it into SIGINT for the foreground job. */
const ETX = "\x03";

export const BUILD_SCRIPT = `${HERE}build_initramfs.sh`;
export const DEFAULT_KERNEL = `${REPO_ROOT}build/e2e/vmlinuz`;
export const DEFAULT_INITRD = `${REPO_ROOT}build/e2e/initramfs.cpio.gz`;
/** The transport module `reloadVsockDriver` unloads and loads again. */
export const VSOCK_TRANSPORT_MODULE = "vmw_vsock_virtio_transport";

export interface GuestBootOptions {
  /** vhost-user socket of the vsock back end (QEMU connects to it). Omit: no vsock device. */
  vhostSocket?: string;
  /** Guest RAM in MiB (default 256). */
  memMiB?: number;
  /** Time allowed from QEMU start to a responsive guest shell (default 60 s). */
  timeoutMs?: number;
  /**
   * Copy of the QEMU command line, the serial console and QEMU's stderr, written as it
   * arrives. Default: `$E2E_LOG_DIR/guest-<time>-<pid>-<n>.log` when E2E_LOG_DIR is set.
   */
  logFile?: string;
  /** Kernel and initramfs; default: build/e2e/ (built on demand by build_initramfs.sh). */
  kernel?: string;
  initrd?: string;
  /** QEMU machine type (default q35). */
  machine?: "q35" | "pc";
  /** Appended to the kernel command line. */
  kernelArgs?: string;
  /**
   * Properties appended to the `vhost-user-vsock-pci` device, e.g. "packed=on" (QEMU then
   * offers VIRTIO_F_RING_PACKED through to the back end).
   */
  vsockDeviceProps?: string;
  /** Extra QEMU arguments (appended). */
  qemuArgs?: string[];
  /** QEMU binary (default qemu-system-x86_64 from PATH). */
  qemu?: string;
}

export interface RunResult {
  /** stdout and stderr of the command, CRs removed, exactly as printed (no trimming). */
  output: string;
  /** exit status ($?) */
  code: number;
}

export interface SpawnResult {
  /** guest pid of the background command (a `sh -c` in its own session) */
  pid: number;
  /** guest file receiving its stdout and stderr */
  log: string;
}

/** Quotes a string for the guest's POSIX shell. */
export function shellQuote(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

function findOnPath(name: string): string | null {
  if (name.includes("/")) return isFile(name) ? name : null;
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    if (dir && isFile(`${dir}/${name}`)) return `${dir}/${name}`;
  }
  return null;
}

function isFile(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}

/**
 * Whether the e2e tests of `what` are skipped: something in `missing` (defaults to
 * `missingPrerequisites()`) is absent and neither CI nor E2E_REQUIRED is set (then they run,
 * and fail). Says so on stderr when skipping.
 */
export function skipE2e(what: string, missing = missingPrerequisites()): boolean {
  const required = Boolean(Deno.env.get("CI") || Deno.env.get("E2E_REQUIRED"));
  const skip = missing.length > 0 && !required;
  if (skip) console.warn(`e2e ${what}: skipped, missing ${missing.join(", ")}`);
  return skip;
}

/**
 * What the harness needs on the host; `[]` when everything is there. Synchronous so that
 * `Deno.test({ ignore })` can use it.
 */
export function missingPrerequisites(): string[] {
  const missing: string[] = [];
  if (!findOnPath("qemu-system-x86_64")) missing.push("qemu-system-x86_64 (qemu-system-x86)");
  let kernel = false;
  try {
    for (const e of Deno.readDirSync("/boot")) {
      if (/^vmlinuz-.*cloud-amd64$/.test(e.name)) kernel = true;
    }
  } catch { /* no /boot */ }
  if (!kernel) missing.push("/boot/vmlinuz-*cloud-amd64 (linux-image-cloud-amd64)");
  if (!findOnPath("busybox") && !isFile("/bin/busybox")) missing.push("busybox (busybox-static)");
  if (!findOnPath("socat")) missing.push("socat (socat)");
  return missing;
}

/** Builds (or finds up to date) build/e2e/{vmlinuz,initramfs.cpio.gz}. */
export async function ensureGuestImage(): Promise<{ kernel: string; initrd: string }> {
  const out = await new Deno.Command("bash", {
    args: [BUILD_SCRIPT],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) {
    const dec = new TextDecoder();
    throw new Error(
      `${BUILD_SCRIPT} failed (exit ${out.code}):\n${dec.decode(out.stdout)}${
        dec.decode(out.stderr)
      }`,
    );
  }
  return { kernel: DEFAULT_KERNEL, initrd: DEFAULT_INITRD };
}

interface Waiter {
  /** returns a value to resolve with, or undefined to keep waiting */
  check(): unknown;
  resolve(v: unknown): void;
}

let logCounter = 0;

function defaultLogFile(): string | undefined {
  const dir = Deno.env.get("E2E_LOG_DIR");
  if (!dir) return undefined;
  Deno.mkdirSync(dir, { recursive: true });
  const time = new Date().toISOString().replaceAll(":", "-");
  return `${dir}/guest-${time}-${Deno.pid}-${++logCounter}.log`;
}

async function waitForPath(path: string, deadline: number): Promise<void> {
  while (true) {
    try {
      Deno.statSync(path);
      return;
    } catch { /* not yet */ }
    if (Date.now() >= deadline) {
      throw new Error(`vhost-user socket ${path} did not appear (is the back end listening?)`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

export class GuestVM {
  /** Milliseconds from spawning QEMU to the first command answered by the guest shell. */
  bootMs = 0;
  /** Guest uptime (seconds) when /init printed the ready marker. */
  guestUptimeAtReady = 0;

  #proc: Deno.ChildProcess;
  #stdin: WritableStreamDefaultWriter<Uint8Array>;
  #console = "";
  #stderr = "";
  #log: Deno.FsFile | null;
  #waiters = new Set<Waiter>();
  #exit: Deno.CommandStatus | null = null;
  #exited: Promise<Deno.CommandStatus>;
  #pumps: Promise<void>;
  #queue: Promise<unknown> = Promise.resolve();
  #nextId = 1;
  #enc = new TextEncoder();
  #args: string[];
  #logPath: string | undefined;

  private constructor(
    proc: Deno.ChildProcess,
    args: string[],
    log: Deno.FsFile | null,
    logPath: string | undefined,
  ) {
    this.#proc = proc;
    this.#logPath = logPath;
    this.#args = args;
    this.#log = log;
    this.#stdin = proc.stdin.getWriter();
    this.#pumps = Promise.all([
      this.#pump(proc.stdout, (t) => {
        this.#console += t;
        this.#writeLog(t);
      }),
      this.#pump(proc.stderr, (t) => {
        this.#stderr += t;
        this.#writeLog(t.replace(/^(?=.)/gm, "[qemu stderr] "));
      }),
    ]).then(() => {});
    this.#exited = proc.status.then((s) => {
      this.#exit = s;
      this.#notify();
      return s;
    });
  }

  /**
   * Starts QEMU and waits until the guest shell answers. Rejects (after killing QEMU) on
   * timeout or if QEMU exits, quoting QEMU's stderr and the console.
   */
  static async boot(opts: GuestBootOptions = {}): Promise<GuestVM> {
    const timeoutMs = opts.timeoutMs ?? 60_000;
    const start = Date.now();
    const deadline = start + timeoutMs;
    const image = opts.kernel && opts.initrd
      ? { kernel: opts.kernel, initrd: opts.initrd }
      : await ensureGuestImage();
    if (opts.vhostSocket) await waitForPath(opts.vhostSocket, deadline);
    const memMiB = opts.memMiB ?? 256;
    const args = [
      ...["-accel", "tcg", "-M", opts.machine ?? "q35", "-cpu", "max", "-smp", "1"],
      ...["-m", `${memMiB}M`, "-nodefaults", "-no-user-config", "-display", "none"],
      ...["-serial", "stdio", "-monitor", "none", "-no-reboot"],
      ...["-kernel", image.kernel, "-initrd", image.initrd],
      ...["-append", `console=ttyS0 quiet panic=-1 no_timer_check ${opts.kernelArgs ?? ""}`.trim()],
    ];
    if (opts.vhostSocket) {
      args.push(
        ...["-object", `memory-backend-memfd,id=mem,size=${memMiB}M,share=on`],
        ...["-numa", "node,memdev=mem"],
        ...["-chardev", `socket,id=vhu,path=${opts.vhostSocket}`],
        ...[
          "-device",
          ["vhost-user-vsock-pci,chardev=vhu", opts.vsockDeviceProps].filter((p) => p).join(","),
        ],
      );
    }
    args.push(...(opts.qemuArgs ?? []));
    const logFile = opts.logFile ?? defaultLogFile();
    const log = logFile
      ? await Deno.open(logFile, { write: true, create: true, truncate: true })
      : null;
    const qemu = opts.qemu ?? "qemu-system-x86_64";
    log?.writeSync(new TextEncoder().encode(`# ${qemu} ${args.join(" ")}\n`));
    let proc: Deno.ChildProcess;
    try {
      proc = new Deno.Command(qemu, {
        args,
        stdin: "piped",
        stdout: "piped",
        stderr: "piped",
      }).spawn();
    } catch (e) {
      log?.close();
      throw new Error(`cannot start ${qemu}: ${e}`);
    }
    const vm = new GuestVM(proc, [qemu, ...args], log, logFile);
    try {
      const ready = new RegExp(`(?:^|\\n)${GUEST_READY_MARKER} ([0-9.]+)\\n`);
      const m = await vm.#waitFor(
        () => ready.exec(vm.#console) ?? undefined,
        deadline - Date.now(),
        "the guest ready marker",
      ) as RegExpExecArray;
      vm.guestUptimeAtReady = Number(m[1]);
      const failed = new RegExp(`${GUEST_MODPROBE_FAILED} (\\S+)`).exec(vm.#console);
      if (failed) throw new Error(`guest failed to load module ${failed[1]}`);
      const probe = await vm.run("echo ok", Math.max(1, deadline - Date.now()));
      if (probe.output !== "ok\n") throw new Error(`unexpected shell probe ${probe.output}`);
      vm.bootMs = Date.now() - start;
      return vm;
    } catch (e) {
      const detail = vm.#diagnostics();
      await vm.#kill();
      throw new Error(`guest boot failed: ${(e as Error).message}\n${detail}`);
    }
  }

  /** The whole serial console so far (CRs removed). */
  get consoleLog(): string {
    return this.#console;
  }

  /** QEMU's stderr so far. */
  get qemuStderr(): string {
    return this.#stderr;
  }

  /** Where the console is being copied, if anywhere. */
  get logFile(): string | undefined {
    return this.#logPath;
  }

  /** The QEMU command line used. */
  get commandLine(): readonly string[] {
    return this.#args;
  }

  /** Whether QEMU is still running. */
  get running(): boolean {
    return this.#exit === null;
  }

  /**
   * Runs `cmd` (one or more lines of shell; stdin is /dev/null) in a subshell of the guest
   * shell and returns its output and exit status. Calls are serialized; `exit N` ends just
   * this command; shell state (cd, variables) does not carry over to the next call. Use
   * `spawn` for background commands (a `&` job would outlive the call and keep its output
   * going to the console). On timeout the command gets ^C and the call rejects; it also
   * rejects if QEMU exits. Errors quote the console tail.
   */
  run(cmd: string, timeoutMs = 30_000): Promise<RunResult> {
    const p = this.#queue.then(() => this.#runNow(cmd, timeoutMs));
    this.#queue = p.catch(() => {});
    return p;
  }

  /** Like `run` but rejects when the exit status is not 0; resolves with the output. */
  async runOk(cmd: string, timeoutMs = 30_000): Promise<string> {
    const r = await this.run(cmd, timeoutMs);
    if (r.code !== 0) {
      throw new Error(`guest command failed (exit ${r.code}): ${cmd}\n${r.output}`);
    }
    return r.output;
  }

  /**
   * Starts `cmd` in the background in its own session (e.g.
   * `socat VSOCK-LISTEN:1234,fork EXEC:cat`), stdin /dev/null, stdout+stderr to a guest log
   * file. Resolves once it is started (not once it is listening: poll for that).
   */
  async spawn(cmd: string, opts: { log?: string } = {}): Promise<SpawnResult> {
    const log = opts.log ?? `/tmp/spawn-${this.#nextId}.log`;
    const out = await this.runOk(
      `( setsid sh -c ${shellQuote(cmd)} </dev/null >${shellQuote(log)} 2>&1 & echo $! )`,
    );
    const pid = Number(out.trim());
    if (!Number.isInteger(pid) || pid <= 0) throw new Error(`spawn: unexpected output ${out}`);
    return { pid, log };
  }

  /**
   * Unloads and reloads the virtio vsock transport (the guest driver resets the device and
   * probes it again). Open AF_VSOCK sockets pin the module: close them first.
   */
  async reloadVsockDriver(timeoutMs = 30_000): Promise<void> {
    await this.runOk(
      `rmmod ${VSOCK_TRANSPORT_MODULE} && modprobe ${VSOCK_TRANSPORT_MODULE}`,
      timeoutMs,
    );
  }

  /** The guest kernel log (the console only shows emergencies, see /init). */
  async dmesg(): Promise<string> {
    return await this.runOk("dmesg");
  }

  /**
   * Powers the guest off (`poweroff -f`), kills QEMU if it has not exited after `timeoutMs`,
   * and always reaps it. Safe to call more than once.
   */
  async shutdown(timeoutMs = 10_000): Promise<Deno.CommandStatus> {
    if (this.#exit === null) {
      await this.#write("\npoweroff -f\n").catch(() => {});
      const exited = await Promise.race([
        this.#exited.then(() => true),
        new Promise<boolean>((r) => {
          const t = setTimeout(() => r(false), timeoutMs);
          this.#exited.then(() => clearTimeout(t));
        }),
      ]);
      if (!exited) this.#writeLog("\n[harness] poweroff timed out: killing QEMU\n");
    }
    return await this.#kill();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.shutdown();
  }

  // ---- internals ---------------------------------------------------------------------------

  async #runNow(cmd: string, timeoutMs: number): Promise<RunResult> {
    const id = this.#nextId++;
    const begin = `${BEGIN_TAG}-${id}\n`;
    const endRe = new RegExp(`\\n${END_TAG}-${id}:(\\d+)\\n`, "g");
    // A subshell, so that `exit` ends only the command; eval of a quoted string, so that a
    // syntax error in cmd (say an unbalanced quote) cannot swallow the lines that follow. The
    // end marker has a line of its own: an interactive shell drops the rest of a line after a
    // syntax error.
    const text = `printf '%s-%s\\n' ${BEGIN_TAG} ${id}; (eval ${shellQuote(cmd)}) </dev/null\n` +
      `printf '\\n%s-%s:%d\\n' ${END_TAG} ${id} $?\n`;
    for (const line of text.split("\n")) {
      if (this.#enc.encode(line).length > MAX_LINE_BYTES) {
        throw new Error(`a guest command line is longer than ${MAX_LINE_BYTES} bytes`);
      }
    }
    const from = this.#console.length;
    await this.#write(text);
    let bodyStart = -1;
    const result = await this.#waitFor(
      () => {
        if (bodyStart < 0) {
          const b = this.#console.indexOf(begin, from);
          if (b < 0) return undefined;
          bodyStart = b + begin.length;
        }
        // The end marker is printed after a newline of its own: what precedes that newline is
        // the output, byte for byte (so "printf abc" gives "abc", "echo abc" gives "abc\n").
        endRe.lastIndex = bodyStart;
        const m = endRe.exec(this.#console);
        if (!m) return undefined;
        return { output: this.#console.slice(bodyStart, m.index), code: Number(m[1]) };
      },
      timeoutMs,
      `the end of guest command: ${cmd}`,
    ).catch(async (e) => {
      // Interrupt it (^C reaches the foreground job through the tty) so that later commands
      // are not stuck behind it.
      await this.#write(ETX).catch(() => {});
      throw e;
    });
    return result as RunResult;
  }

  async #write(text: string): Promise<void> {
    if (this.#exit !== null) throw new Error("QEMU has exited");
    await this.#stdin.write(this.#enc.encode(text));
  }

  async #pump(stream: ReadableStream<Uint8Array>, sink: (t: string) => void): Promise<void> {
    const dec = new TextDecoder();
    try {
      for await (const chunk of stream) {
        sink(dec.decode(chunk, { stream: true }).replaceAll("\r", ""));
        this.#notify();
      }
    } catch { /* stream closed by kill */ }
    const tail = dec.decode();
    if (tail) sink(tail.replaceAll("\r", ""));
    this.#notify();
  }

  #notify(): void {
    for (const w of this.#waiters) {
      const v = w.check();
      if (v !== undefined) {
        this.#waiters.delete(w);
        w.resolve(v);
      }
    }
  }

  /** Resolves with check()'s first defined value; rejects on timeout or QEMU exit. */
  #waitFor(check: () => unknown, timeoutMs: number, what: string): Promise<unknown> {
    return new Promise((resolve, reject) => {
      const w: Waiter = {
        check: () => {
          const v = check();
          if (v !== undefined) return v;
          if (this.#exit !== null) {
            return new Error(
              `QEMU exited (code ${this.#exit.code}) while waiting for ${what}\n` +
                this.#diagnostics(),
            );
          }
          return undefined;
        },
        resolve: (v) => {
          clearTimeout(timer);
          if (v instanceof Error) reject(v);
          else resolve(v);
        },
      };
      const timer = setTimeout(() => {
        this.#waiters.delete(w);
        reject(
          new Error(`timed out after ${timeoutMs} ms waiting for ${what}\n${this.#diagnostics()}`),
        );
      }, Math.max(0, timeoutMs));
      const now = w.check();
      if (now !== undefined) {
        w.resolve(now);
        return;
      }
      this.#waiters.add(w);
    });
  }

  #diagnostics(): string {
    const tail = this.#console.length > CONSOLE_TAIL_CHARS
      ? `...${this.#console.slice(-CONSOLE_TAIL_CHARS)}`
      : this.#console;
    const stderr = this.#stderr.trim() ? `--- QEMU stderr ---\n${this.#stderr.trim()}\n` : "";
    const where = this.#logPath ? ` (whole log: ${this.#logPath})` : "";
    return `${stderr}--- guest console (tail)${where} ---\n${tail}\n--- end of console ---`;
  }

  #writeLog(text: string): void {
    if (!this.#log || !text) return;
    try {
      this.#log.writeSync(this.#enc.encode(text));
    } catch { /* a log write failure must not break the test */ }
  }

  /** SIGKILL if still running, then reap QEMU, drain its pipes and close the log. */
  async #kill(): Promise<Deno.CommandStatus> {
    if (this.#exit === null) {
      try {
        this.#proc.kill("SIGKILL");
      } catch { /* already gone */ }
    }
    const status = await this.#exited;
    await this.#stdin.close().catch(() => {});
    await this.#pumps;
    for (const w of this.#waiters) w.resolve(new Error("QEMU was stopped"));
    this.#waiters.clear();
    if (this.#log) {
      this.#log.close();
      this.#log = null;
    }
    return status;
  }
}
