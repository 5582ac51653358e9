/**
 * The daemon under test as a child process, for the real-guest end-to-end tests.
 *
 * `BackendProcess.start()` runs `<deno> run -A <repo>/main.ts --guest-cid N --socket S
 * --uds-path U ...` in a fresh temporary directory (so the vhost-user socket and the
 * hybrid-vsock sockets `U` and `U_<port>` never collide with another test), copies the
 * daemon's stdout and stderr to a log file as they arrive, and resolves once the vhost-user
 * socket exists (QEMU connects to it as a client, so it must be listening first). It rejects,
 * quoting the log, if the daemon exits or the socket does not appear in time. With `vms`, one
 * daemon serves several sibling VMs (`--vm guest-cid=N,socket=S_N,uds-path=U_N,groups=G` each)
 * and every vhost-user socket must exist.
 *
 * `stop()` sends SIGTERM (the daemon closes its sockets and removes its socket files), sends
 * SIGKILL if it has not exited after a grace period, always reaps the process, drains its
 * pipes and removes the temporary directory. The log goes to
 * `$E2E_LOG_DIR/backend-<time>-<pid>-<n>.log` when E2E_LOG_DIR is set, else to a temporary
 * file that outlives `stop()` (so a failure can quote it); `discardLog()` removes that one.
 */

const REPO_ROOT = new URL("../../", import.meta.url).pathname;
export const MAIN_TS = `${REPO_ROOT}main.ts`;

/** How long the daemon gets to create its vhost-user socket (Deno start-up included). */
const DEFAULT_READY_TIMEOUT_MS = 30_000;
/** Grace period between SIGTERM and SIGKILL. */
const DEFAULT_STOP_TIMEOUT_MS = 5_000;
const POLL_MS = 20;

export interface BackendOptions {
  /** `--guest-cid` (default 3) */
  guestCid?: number;
  /** `--log-level` (default "info") */
  logLevel?: "error" | "warn" | "info" | "debug" | "trace";
  /** more flags, e.g. `["--connect-timeout-ms", "60000"]` */
  extraArgs?: string[];
  /** where the log goes; default: see the module comment */
  logFile?: string;
  /** time allowed until the vhost-user socket exists (default 30 s) */
  readyTimeoutMs?: number;
  /**
   * several VMs in one daemon (`--vm`, replaces `guestCid`): VMs sharing a group reach each
   * other by CID. Their sockets are `sockets[i]` / `udsPaths[i]`.
   */
  vms?: readonly SiblingVm[];
}

/** One VM of a multi-VM daemon. */
export interface SiblingVm {
  guestCid: number;
  /** `groups=` (NAME[+NAME]; default: the daemon's default group) */
  groups?: string;
}

let logCounter = 0;

/** The E2E_LOG_DIR file name, or undefined (then a temporary file is used). */
function logDirFile(): string | undefined {
  const logDir = Deno.env.get("E2E_LOG_DIR");
  if (!logDir) return undefined;
  Deno.mkdirSync(logDir, { recursive: true });
  const time = new Date().toISOString().replaceAll(":", "-");
  return `${logDir}/backend-${time}-${Deno.pid}-${++logCounter}.log`;
}

function isSocket(path: string): boolean {
  try {
    return Deno.statSync(path).isSocket === true;
  } catch {
    return false;
  }
}

export class BackendProcess {
  /** temporary directory holding the sockets */
  readonly dir: string;
  /** vhost-user socket (give it to `GuestVM.boot({ vhostSocket })`); the first VM's */
  readonly socket: string;
  /** hybrid-vsock socket: host apps connect here; guest connects go to `${udsPath}_<port>` */
  readonly udsPath: string;
  /** every VM's vhost-user socket, in `vms` order (one entry without `vms`) */
  readonly sockets: readonly string[];
  /** every VM's hybrid-vsock socket, in `vms` order */
  readonly udsPaths: readonly string[];
  /** the daemon's stdout + stderr */
  readonly logFile: string;
  readonly guestCid: number;
  /** the full command line */
  readonly args: readonly string[];
  /** resolves when the daemon exits */
  readonly exited: Promise<Deno.CommandStatus>;

  #proc: Deno.ChildProcess;
  #status: Deno.CommandStatus | null = null;
  #pumps: Promise<void>;
  #log: Deno.FsFile;
  #tempLog: boolean;
  #stopped: Promise<Deno.CommandStatus> | null = null;

  private constructor(
    proc: Deno.ChildProcess,
    fields: {
      dir: string;
      sockets: string[];
      udsPaths: string[];
      logFile: string;
      guestCid: number;
      args: string[];
      tempLog: boolean;
    },
    log: Deno.FsFile,
  ) {
    this.#proc = proc;
    this.dir = fields.dir;
    this.sockets = fields.sockets;
    this.udsPaths = fields.udsPaths;
    this.socket = fields.sockets[0];
    this.udsPath = fields.udsPaths[0];
    this.logFile = fields.logFile;
    this.guestCid = fields.guestCid;
    this.args = fields.args;
    this.#tempLog = fields.tempLog;
    this.#log = log;
    this.#pumps = Promise.all([this.#pump(proc.stdout), this.#pump(proc.stderr)]).then(() => {});
    this.exited = proc.status.then((s) => {
      this.#status = s;
      return s;
    });
  }

  /** Starts the daemon and waits until its vhost-user socket exists. */
  static async start(opts: BackendOptions = {}): Promise<BackendProcess> {
    const dir = await Deno.makeTempDir({ prefix: "e2e-backend-" });
    const guestCid = opts.vms?.[0]?.guestCid ?? opts.guestCid ?? 3;
    const socket = `${dir}/vhost.sock`;
    const udsPath = `${dir}/vm.vsock`;
    const vmArgs: string[] = [];
    const sockets = opts.vms ? opts.vms.map((v) => `${dir}/vhost-${v.guestCid}.sock`) : [socket];
    const udsPaths = opts.vms ? opts.vms.map((v) => `${dir}/vm-${v.guestCid}.vsock`) : [udsPath];
    for (const [i, v] of (opts.vms ?? []).entries()) {
      const groups = v.groups === undefined ? "" : `,groups=${v.groups}`;
      vmArgs.push(
        "--vm",
        `guest-cid=${v.guestCid},socket=${sockets[i]},uds-path=${udsPaths[i]}${groups}`,
      );
    }
    const named = opts.logFile ?? logDirFile();
    const logFile = named ??
      await Deno.makeTempFile({ prefix: "e2e-backend-", suffix: ".log" });
    const args = [
      ...["run", "-A", MAIN_TS],
      ...(opts.vms
        ? vmArgs
        : ["--guest-cid", String(guestCid), "--socket", socket, "--uds-path", udsPath]),
      ...["--log-level", opts.logLevel ?? "info"],
      ...(opts.extraArgs ?? []),
    ];
    const log = await Deno.open(logFile, { write: true, create: true, truncate: true });
    log.writeSync(new TextEncoder().encode(`# ${Deno.execPath()} ${args.join(" ")}\n`));
    let proc: Deno.ChildProcess;
    try {
      proc = new Deno.Command(Deno.execPath(), {
        args,
        cwd: dir,
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).spawn();
    } catch (e) {
      log.close();
      throw new Error(`cannot start the backend: ${e}`);
    }
    const backend = new BackendProcess(proc, {
      dir,
      sockets,
      udsPaths,
      logFile,
      guestCid,
      args,
      tempLog: named === undefined,
    }, log);
    const deadline = Date.now() + (opts.readyTimeoutMs ?? DEFAULT_READY_TIMEOUT_MS);
    while (!sockets.every(isSocket)) {
      if (backend.#status !== null || Date.now() >= deadline) {
        const why = backend.#status !== null
          ? `exited with status ${backend.#status.code}`
          : `did not create ${sockets.join(", ")} in time`;
        await backend.stop();
        throw new Error(`backend ${why}\n${backend.logTail()}`);
      }
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
    return backend;
  }

  /** pid of the daemon (a Deno process; its reactor workers are threads of it) */
  get pid(): number {
    return this.#proc.pid;
  }

  get running(): boolean {
    return this.#status === null;
  }

  /** The log so far. */
  logText(): string {
    try {
      return Deno.readTextFileSync(this.logFile);
    } catch {
      return "";
    }
  }

  /** The last `chars` characters of the log, framed for an error message. */
  logTail(chars = 4000): string {
    const text = this.logText();
    const tail = text.length > chars ? `...${text.slice(-chars)}` : text;
    return `--- backend log (tail; whole log: ${this.logFile}) ---\n${tail}\n--- end of backend log ---`;
  }

  /** Log lines at ERROR level (the logger writes `<time> ERROR ...`). */
  errorLines(): string[] {
    return this.logText().split("\n").filter((l) => /^\S+ ERROR /.test(l));
  }

  /** Names of the fds the daemon has open (`/proc/<pid>/fd` link targets). */
  openFds(): string[] {
    const out: string[] = [];
    for (const e of Deno.readDirSync(`/proc/${this.pid}/fd`)) {
      try {
        out.push(Deno.readLinkSync(`/proc/${this.pid}/fd/${e.name}`));
      } catch { /* closed meanwhile */ }
    }
    return out;
  }

  /** Removes the log if it is a temporary file (not E2E_LOG_DIR's, not `opts.logFile`). */
  async discardLog(): Promise<void> {
    if (this.#tempLog) await Deno.remove(this.logFile).catch(() => {});
  }

  /**
   * SIGTERM, then SIGKILL after `timeoutMs`; reaps the daemon, drains its pipes, closes the
   * log and removes the temporary directory. Safe to call more than once.
   */
  stop(timeoutMs = DEFAULT_STOP_TIMEOUT_MS): Promise<Deno.CommandStatus> {
    this.#stopped ??= this.#stop(timeoutMs);
    return this.#stopped;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }

  async #stop(timeoutMs: number): Promise<Deno.CommandStatus> {
    if (this.#status === null) {
      this.#signal("SIGTERM");
      let timer: ReturnType<typeof setTimeout> | undefined;
      const exited = await Promise.race([
        this.exited.then(() => true),
        new Promise<boolean>((r) => timer = setTimeout(() => r(false), timeoutMs)),
      ]);
      clearTimeout(timer);
      if (!exited) {
        this.#writeLog(`\n[harness] no exit ${timeoutMs} ms after SIGTERM: SIGKILL\n`);
        this.#signal("SIGKILL");
      }
    }
    const status = await this.exited;
    await this.#pumps;
    this.#log.close();
    await Deno.remove(this.dir, { recursive: true }).catch(() => {});
    return status;
  }

  #signal(sig: Deno.Signal): void {
    try {
      this.#proc.kill(sig);
    } catch { /* already exited */ }
  }

  async #pump(stream: ReadableStream<Uint8Array>): Promise<void> {
    try {
      for await (const chunk of stream) this.#log.writeSync(chunk);
    } catch { /* pipe closed */ }
  }

  #writeLog(text: string): void {
    try {
      this.#log.writeSync(new TextEncoder().encode(text));
    } catch { /* log closed */ }
  }
}
