/**
 * The virtio device status field (virtio 1.3, 2.1 "Device Status Field"): the bits the
 * driver sets as it finds, negotiates with and starts a device, and the bits that report
 * failure. vhost-user carries the byte in SET_STATUS / GET_STATUS.
 */

/** Device status bit: the guest found the device. */
export const VIRTIO_CONFIG_S_ACKNOWLEDGE = 1;
/** Device status bit: the guest has a driver for the device. */
export const VIRTIO_CONFIG_S_DRIVER = 2;
/** Device status bit: the driver is set up and ready to drive the device. */
export const VIRTIO_CONFIG_S_DRIVER_OK = 4;
/** Device status bit: feature negotiation is complete. */
export const VIRTIO_CONFIG_S_FEATURES_OK = 8;
/** Device status bit: the device hit an error and needs a reset. */
export const VIRTIO_CONFIG_S_NEEDS_RESET = 0x40;
/** Device status bit: the guest gave up on the device. */
export const VIRTIO_CONFIG_S_FAILED = 0x80;
