/**
 * Runs a vhost-user vsock back end as a child process for tests: ours
 * (`deno run -A <repo>/main.ts --guest-cid <cid> --socket <path> --uds-path <path>`, the
 * vhost-device-vsock flags) or any other binary given as a command template.
 *
 * Each back end gets a fresh temporary directory holding its vhost-user socket
 * (`vhost.sock`) and hybrid-vsock socket (`vsock.sock`, host listeners at `vsock.sock_<port>`).
 * `spawnBackend` resolves once the vhost-user socket file exists, and fails early, with the
 * child's stderr, if the child exits first. stdout and stderr are drained continuously (a full
 * pipe would stall the child) and kept for diagnostics. `stop()` sends SIGTERM, waits, sends
 * SIGKILL after a grace period, removes the directory and returns what the child printed.
 */

/** Options of `spawnBackend`. */
export interface BackendOptions {
  /**
   * Command line template, split on whitespace after substituting `{socket}`, `{uds}` and
   * `{cid}` (e.g. `"vhost-device-vsock --vm guest-cid={cid},socket={socket},uds-path={uds}"`).
   * Default: `<deno> run -A <repo>/main.ts --guest-cid {cid} --socket {socket} --uds-path {uds}`
   * plus `--log-level <logLevel>`.
   */
  readonly command?: string;
  /** guest CID (default 3) */
  readonly cid?: number;
  /** `--log-level` for the default command (default "info") */
  readonly logLevel?: string;
  /** appended to the command line */
  readonly extraArgs?: readonly string[];
  /** how long to wait for the socket file (default 20000 ms) */
  readonly startTimeoutMs?: number;
  /** extra environment variables */
  readonly env?: Record<string, string>;
  /** copy the child's stderr to ours as it arrives (default false; also env VSOCK_TEST_STDERR=1) */
  readonly echoStderr?: boolean;
}

/** What `stop()` reports. */
export interface BackendExit {
  /** exit code (128 + signal number when killed by a signal) */
  readonly code: number;
  readonly signal: Deno.Signal | null;
  readonly stdout: string;
  readonly stderr: string;
  /** whether SIGKILL was needed */
  readonly killed: boolean;
}

/** A running back end. */
export interface BackendProcess {
  readonly pid: number;
  /** the temporary directory of this back end */
  readonly dir: string;
  /** vhost-user socket path */
  readonly socketPath: string;
  /** hybrid vsock socket path (`--uds-path`) */
  readonly udsPath: string;
  readonly cid: number;
  /** the command line run */
  readonly args: readonly string[];
  /** resolves when the child exits (without stopping it) */
  readonly exited: Promise<Deno.CommandStatus>;
  /** whether the child is still running */
  readonly running: boolean;
  /** everything the child printed to stderr so far */
  stderr(): string;
  /** everything the child printed to stdout so far */
  stdout(): string;
  /** SIGTERM, wait up to `graceMs` (default 5000), then SIGKILL; removes the directory */
  stop(graceMs?: number): Promise<BackendExit>;
}

/** The repository root (two levels above this file). */
export function repoRoot(): string {
  return new URL("../../", import.meta.url).pathname.replace(/\/$/, "");
}

/** Starts a back end (see the module doc). */
export async function spawnBackend(opts: BackendOptions = {}): Promise<BackendProcess> {
  const cid = opts.cid ?? 3;
  const dir = await Deno.makeTempDir({ prefix: "vsock-test-" });
  const socketPath = `${dir}/vhost.sock`;
  const udsPath = `${dir}/vsock.sock`;
  let args: string[];
  if (opts.command !== undefined) {
    args = opts.command
      .replaceAll("{socket}", socketPath)
      .replaceAll("{uds}", udsPath)
      .replaceAll("{cid}", String(cid))
      .split(/\s+/)
      .filter((a) => a.length > 0);
  } else {
    args = [
      Deno.execPath(),
      "run",
      "-A",
      `${repoRoot()}/main.ts`,
      "--guest-cid",
      String(cid),
      "--socket",
      socketPath,
      "--uds-path",
      udsPath,
      "--log-level",
      opts.logLevel ?? "info",
    ];
  }
  args.push(...(opts.extraArgs ?? []));
  if (args.length === 0) throw new Error("spawnBackend: empty command");

  const child = new Deno.Command(args[0], {
    args: args.slice(1),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    env: opts.env,
  }).spawn();
  const echo = opts.echoStderr ?? Deno.env.get("VSOCK_TEST_STDERR") === "1";
  const out = { stdout: "", stderr: "" };
  const drain = async (stream: ReadableStream<Uint8Array>, which: "stdout" | "stderr") => {
    const dec = new TextDecoder();
    for await (const chunk of stream) {
      out[which] += dec.decode(chunk, { stream: true });
      if (echo && which === "stderr") await Deno.stderr.write(chunk);
    }
  };
  const drains = Promise.all([drain(child.stdout, "stdout"), drain(child.stderr, "stderr")]);
  let running = true;
  const exited = child.status.then((s) => {
    running = false;
    return s;
  });

  let stopped: Promise<BackendExit> | null = null;
  const stop = (graceMs = 5000): Promise<BackendExit> => {
    stopped ??= (async () => {
      let killed = false;
      if (running) {
        try {
          child.kill("SIGTERM");
        } catch { /* already gone */ }
        let timer: ReturnType<typeof setTimeout> | undefined;
        const grace = new Promise<"timeout">((r) => {
          timer = setTimeout(() => r("timeout"), graceMs);
        });
        const first = await Promise.race([exited, grace]);
        clearTimeout(timer);
        if (first === "timeout") {
          killed = true;
          try {
            child.kill("SIGKILL");
          } catch { /* gone */ }
        }
      }
      const status = await exited;
      await drains;
      await Deno.remove(dir, { recursive: true }).catch(() => {});
      return {
        code: status.code,
        signal: status.signal,
        stdout: out.stdout,
        stderr: out.stderr,
        killed,
      };
    })();
    return stopped;
  };

  // Wait for the socket file, or the child's early death.
  const deadline = Date.now() + (opts.startTimeoutMs ?? 20000);
  for (;;) {
    try {
      if (Deno.lstatSync(socketPath).isSocket) break;
    } catch { /* not yet */ }
    if (!running) {
      const r = await stop();
      throw new Error(
        `back end exited (code ${r.code}) before creating ${socketPath}\n` +
          `command: ${args.join(" ")}\nstderr:\n${r.stderr}`,
      );
    }
    if (Date.now() >= deadline) {
      const r = await stop(1000);
      throw new Error(
        `back end did not create ${socketPath} within ${opts.startTimeoutMs ?? 20000} ms\n` +
          `command: ${args.join(" ")}\nstderr:\n${r.stderr}`,
      );
    }
    await new Promise((r) => setTimeout(r, 20));
  }

  return {
    pid: child.pid,
    dir,
    socketPath,
    udsPath,
    cid,
    args,
    exited,
    get running() {
      return running;
    },
    stderr: () => out.stderr,
    stdout: () => out.stdout,
    stop,
  };
}
