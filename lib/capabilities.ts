/**
 * `--print-capabilities`, from the "Backend program conventions" of QEMU's
 * `docs/interop/vhost-user.rst`: the back end prints its capabilities to stdout as JSON and
 * exits successfully, without doing its normal work. The document is a
 * `VHostUserBackendCapabilities` of `docs/interop/vhost-user.json`: an object whose `type` is
 * the `VHostUserBackendType` ("vsock" here), plus a `features` list of supported command-line
 * features for the back-end types whose schema defines one. The schema defines none for
 * vsock yet; we list what this back end adds over a plain vsock back end, so management
 * tools (and people) can see it: consumers that only know the schema's names ignore them.
 */

/** `VHostUserBackendType` of a virtio-vsock back end. */
export const VHOST_USER_BACKEND_TYPE = "vsock";

/**
 * Features reported in the `features` list, spelled like the schema's names:
 * - "device-state": snapshot/restore through SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE
 *   (with TRANSPORT_RESET delivery when the front end hands over the event queue);
 * - "dirty-log": LOG_SHMFD + VHOST_F_LOG_ALL dirty-page logging for live migration;
 * - "siblings": VMs of one daemon sharing a group reach each other by CID;
 * - "seqpacket": SOCK_SEQPACKET vsock sockets (VIRTIO_VSOCK_F_SEQPACKET);
 * - "datagrams": SOCK_DGRAM vsock sockets with `--dgram` (VIRTIO_VSOCK_F_DGRAM, bit 3, not in
 *   the virtio spec);
 * - "fair-rx": deficit round robin over flows on the guest's rx queue (`--rx-weight`);
 * - "packed-rings": packed virtqueues (VIRTIO_F_RING_PACKED; QEMU's `packed=on`).
 */
export const VHOST_USER_BACKEND_FEATURES: readonly string[] = [
  "device-state",
  "dirty-log",
  "siblings",
  "seqpacket",
  "datagrams",
  "fair-rx",
  "packed-rings",
];

/** The JSON document, pretty-printed with two-space indents, without a trailing newline. */
export function capabilitiesJson(
  features: readonly string[] = VHOST_USER_BACKEND_FEATURES,
): string {
  const capabilities: { type: string; features?: string[] } = { type: VHOST_USER_BACKEND_TYPE };
  if (features.length > 0) capabilities.features = [...features];
  return JSON.stringify(capabilities, null, 2);
}
