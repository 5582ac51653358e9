/**
 * Shared pieces of the real-guest e2e tests (qemu_vsock_test.ts, qemu_seqpacket_test.ts):
 * deadlines, failure diagnostics (the guest console tail and the backend log tail), guest
 * commands that quote the backend log when they fail, background guest processes, and the
 * per-scenario time report (`e2e: <what>: <n> ms`).
 */
import type { GuestVM } from "./guest_vm.ts";
import type { BackendProcess } from "./backend.ts";

/** Deadlines: generous for TCG on a busy 2-core machine, short enough to never hang CI. */
export const BOOT_TIMEOUT_MS = 90_000;
export const TRANSFER_TIMEOUT_MS = 60_000;
export const GUEST_CMD_TIMEOUT_MS = 30_000;
/** How long a guest listener may take to come up (socat start-up under TCG). */
export const LISTEN_TIMEOUT_MS = 15_000;
/**
 * Under TCG on a loaded host the kernel's IO-APIC timer check can fail ("IO-APIC + timer
 * doesn't work!", a panic at boot); the check is pointless on a virtual machine.
 */
export const GUEST_KERNEL_ARGS = "no_timer_check";

/** What a failure message quotes: the guest console tail and the backend log tail. */
export interface Diagnostics {
  vm?: GuestVM;
  backend?: BackendProcess;
}

export function tail(text: string, chars = 3000): string {
  return text.length > chars ? `...${text.slice(-chars)}` : text;
}

export function diagnostics(d: Diagnostics): string {
  const parts: string[] = [];
  if (d.vm) {
    const where = d.vm.logFile ? ` (whole log: ${d.vm.logFile})` : "";
    parts.push(`--- guest console (tail)${where} ---\n${tail(d.vm.consoleLog)}`);
  }
  if (d.backend) parts.push(d.backend.logTail(3000));
  return parts.join("\n");
}

/**
 * Resolves like `p`, or rejects after `ms` with `what` and the diagnostics. `p` is never left
 * with an unhandled rejection (the caller's finally block closes what it waits on).
 */
export async function within<T>(
  p: Promise<T>,
  ms: number,
  what: string,
  d: Diagnostics,
): Promise<T> {
  p.catch(() => {});
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`timed out after ${ms} ms waiting for ${what}\n${diagnostics(d)}`)),
      ms,
    );
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A guest to run commands on, and the backend whose log a failure quotes (if any). */
export type GuestDiagnostics = Diagnostics & { vm: GuestVM };

/** Rethrows a guest command failure with the backend log appended. */
export async function guestOk(d: GuestDiagnostics, cmd: string, ms = GUEST_CMD_TIMEOUT_MS) {
  try {
    return await d.vm.runOk(cmd, ms);
  } catch (e) {
    throw new Error(`${(e as Error).message}\n${d.backend?.logTail(3000) ?? ""}`);
  }
}

export async function guestRun(d: GuestDiagnostics, cmd: string, ms = GUEST_CMD_TIMEOUT_MS) {
  try {
    return await d.vm.run(cmd, ms);
  } catch (e) {
    throw new Error(`${(e as Error).message}\n${d.backend?.logTail(3000) ?? ""}`);
  }
}

export function report(what: string, ms: number): void {
  console.log(`e2e: ${what}: ${Math.round(ms)} ms`);
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export interface GuestProcess {
  pid: number;
  /** guest file receiving its stdout and stderr */
  log: string;
  /** kills its whole session (it runs in a session of its own) */
  stop(): Promise<void>;
  /** shell test: true while the process exists and is not a zombie */
  aliveTest: string;
}

/** Starts a background guest command (see `GuestVM.spawn`). */
export async function guestSpawn(d: GuestDiagnostics, cmd: string): Promise<GuestProcess> {
  const { pid, log } = await d.vm.spawn(cmd);
  return {
    pid,
    log,
    stop: async () => {
      await d.vm.run(`kill -9 -- -${pid} 2>/dev/null; kill -9 ${pid} 2>/dev/null; true`)
        .catch(() => {});
    },
    aliveTest: `{ [ -e /proc/${pid}/status ] && ! grep -q '^State:.*Z' /proc/${pid}/status; }`,
  };
}
