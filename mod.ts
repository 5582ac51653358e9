/**
 * vhost-user-vsock as a library: run the daemon in-process (`startDaemon`), or
 * assemble the pieces yourself (reactor, vhost-user back end, vsock device).
 *
 * The scripting/testing library (emulated VMM front end + guest driver) is the
 * separate export `./testing` (`lib/testing/mod.ts`).
 */
export { startDaemon } from "./lib/supervisor.ts";
export type { RunningDaemon } from "./lib/supervisor.ts";
export { Daemon } from "./lib/daemon.ts";
export type { VmInstance } from "./lib/daemon.ts";
export {
  ConfigError,
  defaultDaemonConfig,
  parseArgs,
  parseConfigYaml,
  parseVmSpec,
  USAGE,
  VERSION,
} from "./lib/config.ts";
export type { DaemonConfig, LogLevel, VmConfig } from "./lib/config.ts";
export { Reactor } from "./lib/reactor.ts";
export { log } from "./lib/log.ts";
export { VhostUserBackend } from "./lib/vhost_user/backend.ts";
export type { VirtioDevice } from "./lib/vhost_user/device.ts";
export { VsockDevice } from "./lib/vsock/device.ts";
export type { VsockDeviceOptions } from "./lib/vsock/device.ts";
export { decodeSnapshot, encodeSnapshot, SnapshotError } from "./lib/snapshot/format.ts";
