/**
 * `--print-capabilities`, from the "Backend program conventions" of QEMU's
 * `docs/interop/vhost-user.rst`: the back end prints its capabilities to stdout as JSON and
 * exits successfully, without doing its normal work. The document is a
 * `VHostUserBackendCapabilities` of `docs/interop/vhost-user.json`: an object whose `type` is
 * the `VHostUserBackendType` ("vsock" here), plus a `features` list of supported command-line
 * features for the back-end types whose schema defines one. The schema defines none for
 * vsock yet, so the list is omitted while it is empty and the output is `{"type": "vsock"}`.
 */

/** `VHostUserBackendType` of a virtio-vsock back end. */
export const VHOST_USER_BACKEND_TYPE = "vsock";

/**
 * Features to report in the `features` list (names as the schema would spell them, e.g.
 * "dgram"). Empty until vhost-user.json defines vsock features.
 */
export const VHOST_USER_BACKEND_FEATURES: readonly string[] = [];

/** The JSON document, pretty-printed with two-space indents, without a trailing newline. */
export function capabilitiesJson(
  features: readonly string[] = VHOST_USER_BACKEND_FEATURES,
): string {
  const capabilities: { type: string; features?: string[] } = { type: VHOST_USER_BACKEND_TYPE };
  if (features.length > 0) capabilities.features = [...features];
  return JSON.stringify(capabilities, null, 2);
}
