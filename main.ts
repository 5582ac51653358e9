/**
 * vhost-user-vsock: the command-line entry point.
 *
 * Flags (compatible with rust-vmm's vhost-device-vsock) -> DaemonConfig ->
 * reactor worker. SIGINT/SIGTERM stop the reactor cleanly (host sockets closed,
 * socket files removed). Bad flags: one line on stderr, exit status 2.
 */
import { capabilitiesJson } from "./lib/capabilities.ts";
import { ConfigError, parseArgs, USAGE, VERSION } from "./lib/config.ts";
import { log } from "./lib/log.ts";
import { type RunningDaemon, startDaemon } from "./lib/supervisor.ts";

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
  // Signals are taken from the start: one that arrives while the sockets are being created
  // stops the daemon as soon as it is up (instead of killing the process with the socket
  // files left behind).
  let stopRequested: string | null = null;
  let daemon: RunningDaemon | null = null;
  const stop = (sig: string) => {
    log.info(`${sig}: shutting down`);
    stopRequested = sig;
    daemon?.stop();
  };
  Deno.addSignalListener("SIGINT", () => stop("SIGINT"));
  Deno.addSignalListener("SIGTERM", () => stop("SIGTERM"));
  try {
    daemon = await startDaemon(config);
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
  if (stopRequested !== null) daemon.stop();
  await daemon.stopped;
  log.info("stopped");
  return 0;
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
