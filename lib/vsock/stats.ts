/**
 * Counters of one vsock device, for logs and tests: packets and payload bytes each way,
 * connections ended, and descriptor chains the guest got wrong.
 */

/** Counters for logs and tests. */
export interface DeviceStats {
  txPackets: number;
  rxPackets: number;
  txBytes: number;
  rxBytes: number;
  resets: number;
  badChains: number;
}

/** All counters at zero. */
export function newDeviceStats(): DeviceStats {
  return { txPackets: 0, rxPackets: 0, txBytes: 0, rxBytes: 0, resets: 0, badChains: 0 };
}
