/**
 * ffi/: the only place that touches libc. Re-exports the typed wrappers.
 */
export * from "./errno.ts";
export * from "./fd.ts";
export * from "./socket.ts";
export * from "./memory.ts";
export * from "./events.ts";
export * from "./process.ts";
export * from "./message.ts";
