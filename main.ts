/**
 * vhost-user-vsock: the command-line entry point.
 *
 * Flags (compatible with rust-vmm's vhost-device-vsock) -> DaemonConfig -> the VMs sharded
 * over `--workers` supervised worker processes (`lib/process_supervisor.ts`), or, with
 * `--workers 0`, one reactor Worker thread in this process (`lib/supervisor.ts`).
 * SIGINT/SIGTERM stop everything cleanly (host sockets closed, socket files removed).
 * Bad flags: one line on stderr, exit status 2.
 *
 * The same file is the worker process: run with WORKER_ENV set, it serves the VMs its
 * supervisor hands it (`lib/worker_process.ts`), so `deno compile` and `deno bundle` need no
 * second entry point.
 */
import { capabilitiesJson } from "./lib/capabilities.ts";
import { ConfigError, defaultWorkerCount, parseArgs, USAGE, VERSION } from "./lib/config.ts";
import { log } from "./lib/log.ts";
import { startSupervised } from "./lib/process_supervisor.ts";
import { type RunningDaemon, startDaemon } from "./lib/supervisor.ts";
import { WORKER_ENV } from "./lib/worker_plan.ts";
import { runWorkerProcess } from "./lib/worker_process.ts";

async function main(argv: string[]): Promise<number> {
  let config;
  try {
    config = parseArgs(argv);
  } catch (e) {
    if (e instanceof ConfigError) {
      console.error(`vhost-user-vsock: ${e.message} (try --help)`);
      return 2;
    }
    throw e;
  }
  if (config.printHelp) {
    console.log(USAGE);
    return 0;
  }
  if (config.printVersion) {
    console.log(`vhost-user-vsock ${VERSION}`);
    return 0;
  }
  if (config.printCapabilities) {
    console.log(capabilitiesJson());
    return 0;
  }
  log.setLevel(config.logLevel);
  const workers = config.workers ?? defaultWorkerCount(config.vms.length);
  // Listen before starting: the socket files appear (and a supervisor may signal us) before
  // the start completes; a signal then stops the daemon as soon as it is up.
  let daemon: RunningDaemon | null = null;
  let signalled = false;
  const stop = (sig: string) => {
    log.info(`${sig}: shutting down`);
    signalled = true;
    daemon?.stop();
  };
  Deno.addSignalListener("SIGINT", () => stop("SIGINT"));
  Deno.addSignalListener("SIGTERM", () => stop("SIGTERM"));
  try {
    daemon = workers === 0 ? await startDaemon(config) : await startSupervised(config, workers);
  } catch (e) {
    log.error(`cannot start: ${e instanceof Error ? e.message : e}`);
    return 1;
  }
  for (const vm of config.vms) {
    log.info(
      `serving guest CID ${vm.guestCid}: vhost-user socket ${
        vm.socket || `fd ${config.socketFd}`
      }, host side ${vm.udsPath}`,
    );
  }
  if (workers > 0) {
    log.info(`${Math.min(workers, config.vms.length)} worker process(es), watchdog on`);
  }
  if (signalled) daemon.stop();
  await daemon.stopped;
  log.info("stopped");
  return 0;
}

if (import.meta.main) {
  const worker = Deno.env.get(WORKER_ENV);
  Deno.exit(worker !== undefined ? await runWorkerProcess(worker) : await main(Deno.args));
}
