/**
 * Device-side split virtqueue (lib/virtio/split_queue.ts): the notification protocol. Used
 * notifications (VRING_AVAIL_F_NO_INTERRUPT, EVENT_IDX batching and used_event windows, more
 * than 2^16 entries between decisions, NOTIFY_ON_EMPTY), available notifications
 * (VRING_USED_F_NO_NOTIFY, avail_event), and "enable notification, then re-check":
 * enableNotification and popOrArm report buffers published while the device re-armed.
 */

import assert from "node:assert/strict";
import { compactRingLayout, VRING_USED_F_NO_NOTIFY } from "../../lib/virtio/split_layout.ts";
import { POP_CHAIN, POP_EMPTY } from "../../lib/virtio/virtqueue.ts";
import { BUF, rd, RING_BASE, type Setup, setup, wr } from "./split_queue_fixture.ts";

// ---------------------------------------------------------------------------
// Notifications

Deno.test("used notifications without EVENT_IDX follow VRING_AVAIL_F_NO_INTERRUPT", () => {
  const { drv, dev, chain } = setup();
  assert.equal(dev.needsNotification(), false, "nothing published yet");
  for (let i = 0; i < 4; i++) drv.addBuffer([wr(BUF + 0x100 * i, 64)]);
  drv.publish();
  dev.pop(chain);
  dev.pushUsed(chain.head, 1);
  dev.publishUsed();
  assert.equal(dev.needsNotification(), true);
  assert.equal(dev.needsNotification(), false, "already decided for this batch");
  drv.disableCallbacks();
  dev.pop(chain);
  dev.pushUsed(chain.head, 1);
  dev.publishUsed();
  assert.equal(dev.needsNotification(), false);
  assert.equal(drv.enableCallbacks(), true, "two used elements pending");
  dev.pop(chain);
  dev.pushUsed(chain.head, 1);
  dev.publishUsed();
  assert.equal(dev.needsNotification(), true);
});

Deno.test("EVENT_IDX used notifications: first always, used_event window, batches of several", () => {
  const { drv, dev, chain } = setup({ eventIdx: true });
  for (let i = 0; i < 8; i++) drv.addBuffer([wr(BUF + 0x100 * i, 64)]);
  drv.publish();
  assert.equal(drv.enableCallbacks(), false); // used_event = 0
  const complete = (n: number) => {
    for (let i = 0; i < n; i++) {
      assert.equal(dev.pop(chain), POP_CHAIN);
      dev.pushUsed(chain.head, 0);
    }
    dev.publishUsed();
  };
  complete(1);
  assert.equal(dev.needsNotification(), true, "first decision");
  complete(1); // used_event still 0: the driver was told about entry 0 and has not reaped
  assert.equal(dev.needsNotification(), false);
  assert.notEqual(drv.popUsed(), null);
  assert.notEqual(drv.popUsed(), null); // used_event = 2
  // One decision for a batch of two: used_event (2) is the batch's first entry. Comparing
  // with only the last step (old = new - 1) would miss it.
  complete(2);
  assert.equal(dev.needsNotification(), true);
  assert.equal(dev.needsNotification(), false, "nothing new");
  // Driver suppresses: used_event moved far away.
  drv.disableCallbacks();
  complete(2);
  assert.equal(dev.needsNotification(), false);
  // Driver re-arms at its next unreaped entry (2), which was published long ago: enable
  // reports pending work (so the driver polls) and the device need not notify again.
  assert.equal(drv.enableCallbacks(), true);
  while (drv.popUsed() !== null) { /* reap */ }
  assert.equal(drv.enableCallbacks(), false); // used_event = 6
  complete(2);
  assert.equal(dev.needsNotification(), true);
});

Deno.test("EVENT_IDX: more than 2^16 entries between decisions still notify", () => {
  const { drv, dev } = setup({ size: 4, eventIdx: true });
  dev.pushUsed(0, 0);
  dev.publishUsed();
  assert.equal(dev.needsNotification(), true);
  drv.setUsedEventRaw(0x1234);
  // 65536 more entries: new idx == old idx mod 2^16, so vring_need_event alone says no.
  for (let i = 0; i < 0x4000; i++) {
    for (let k = 0; k < 4; k++) dev.pushUsed(k, 0);
    dev.publishUsed();
  }
  assert.equal(dev.usedIdx, 1);
  assert.equal(dev.needsNotification(), true);
  // Back to normal afterwards.
  dev.pushUsed(0, 0);
  dev.publishUsed();
  assert.equal(dev.needsNotification(), false);
});

Deno.test("NOTIFY_ON_EMPTY: notify when the ring runs dry despite NO_INTERRUPT", () => {
  for (const notifyOnEmpty of [false, true]) {
    const { drv, dev, chain } = setup({ notifyOnEmpty });
    drv.disableCallbacks();
    drv.addBuffer([wr(BUF, 8)]);
    drv.addBuffer([wr(BUF + 8, 8)]);
    drv.publish();
    assert.equal(dev.pop(chain), POP_CHAIN);
    dev.pushUsed(chain.head, 0);
    dev.publishUsed();
    assert.equal(dev.needsNotification(), false, "buffers remain");
    assert.equal(dev.isEmpty(), false);
    assert.equal(dev.pop(chain), POP_CHAIN);
    assert.equal(dev.isEmpty(), true);
    assert.equal(dev.inFlight, 1);
    dev.pushUsed(chain.head, 0);
    dev.publishUsed();
    assert.equal(dev.inFlight, 0);
    assert.equal(dev.needsNotification(), notifyOnEmpty);
  }
});

Deno.test("available notifications without EVENT_IDX: VRING_USED_F_NO_NOTIFY", () => {
  const { drv, dev, dirty } = setup();
  drv.addBuffer([wr(BUF, 8)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), true);
  dev.disableNotification();
  assert.equal(drv.readUsedFlags() & VRING_USED_F_NO_NOTIFY, VRING_USED_F_NO_NOTIFY);
  assert.equal(dirty.length, 1);
  drv.addBuffer([wr(BUF, 8)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), false);
  assert.equal(dev.availableCount(), 2);
  assert.equal(dev.enableNotification(), false, "nothing new since the device looked");
  assert.equal(drv.readUsedFlags() & VRING_USED_F_NO_NOTIFY, 0);
  drv.addBuffer([wr(BUF, 8)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), true);
});

Deno.test("available notifications with EVENT_IDX: avail_event = avail idx seen", () => {
  const { drv, dev, chain } = setup({ eventIdx: true });
  dev.disableNotification(); // a no-op with EVENT_IDX
  assert.equal(drv.readUsedFlags(), 0);
  assert.equal(dev.enableNotification(), false);
  assert.equal(drv.readAvailEvent(), 0);
  drv.addBuffer([wr(BUF, 8)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), true);
  drv.addBuffer([wr(BUF, 8)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), false, "the device was already kicked past avail_event");
  while (dev.pop(chain) === POP_CHAIN) { /* drain */ }
  assert.equal(dev.enableNotification(), false);
  assert.equal(drv.readAvailEvent(), 2);
  drv.addBuffer([wr(BUF, 8)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), true);
});

// Enable notification, then re-check: the device found too few buffers, the driver added more
// without kicking (avail_event was stale), then the device re-armed and went to sleep: a stall
// forever.
Deno.test("enable notification, then re-check: enableNotification reports buffers added before the re-arm (EVENT_IDX)", () => {
  const { drv, dev } = setup({ eventIdx: true });
  assert.equal(dev.enableNotification(), false);
  for (let i = 0; i < 3; i++) drv.addBuffer([wr(BUF + 0x100 * i, 64)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), true);
  // The device needs 5 buffers for its packet and sees only 3 ...
  assert.equal(dev.availableCount(), 3);
  // ... the driver adds 2 more; avail_event (0) is behind, so it does not kick ...
  drv.addBuffer([wr(BUF + 0x300, 64)]);
  drv.addBuffer([wr(BUF + 0x400, 64)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), false);
  // ... the device re-arms. No kick will ever come for these 2 buffers, so
  // enableNotification must report them.
  assert.equal(dev.enableNotification(), true);
  assert.equal(dev.availableCount(), 5);
  // Nothing new now: the device may sleep, and the next buffer does kick.
  assert.equal(dev.enableNotification(), false);
  assert.equal(drv.readAvailEvent(), 5);
  drv.addBuffer([wr(BUF + 0x500, 64)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), true);
});

Deno.test("enable notification, then re-check: drain, buffers arrive, re-arm reports them (without EVENT_IDX)", () => {
  const { drv, dev, chain } = setup();
  drv.addBuffer([rd(BUF, 8)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), true);
  dev.disableNotification();
  assert.equal(dev.pop(chain), POP_CHAIN);
  assert.equal(dev.pop(chain), POP_EMPTY);
  // Between the device's empty check and its re-arm:
  drv.addBuffer([rd(BUF, 8)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), false);
  assert.equal(dev.enableNotification(), true);
  assert.equal(dev.pop(chain), POP_CHAIN);
  assert.equal(dev.pop(chain), POP_EMPTY);
  assert.equal(dev.enableNotification(), false);
});

// ---------------------------------------------------------------------------
// popOrArm: pop, or arm notifications and re-check ("enable notification, then re-check")

Deno.test("popOrArm on an empty ring arms notifications and reports POP_EMPTY", () => {
  // EVENT_IDX: avail_event = the avail idx the device has consumed up to.
  {
    const { drv, dev, chain } = setup({ eventIdx: true });
    drv.addBuffer([wr(BUF, 8)]);
    drv.addBuffer([wr(BUF + 8, 8)]);
    drv.publish();
    assert.equal(dev.popOrArm(chain), POP_CHAIN);
    assert.equal(dev.popOrArm(chain), POP_CHAIN);
    assert.equal(drv.readAvailEvent(), 0, "not armed while buffers were there");
    assert.equal(dev.popOrArm(chain), POP_EMPTY);
    assert.equal(drv.readAvailEvent(), 2, "armed at the next avail idx");
    drv.addBuffer([wr(BUF, 8)]);
    drv.publish();
    assert.equal(drv.kickNeeded(), true, "the next buffer comes with a kick");
  }
  // Without EVENT_IDX: VRING_USED_F_NO_NOTIFY cleared.
  {
    const { drv, dev, chain } = setup();
    dev.disableNotification();
    assert.equal(drv.readUsedFlags() & VRING_USED_F_NO_NOTIFY, VRING_USED_F_NO_NOTIFY);
    assert.equal(dev.popOrArm(chain), POP_EMPTY);
    assert.equal(drv.readUsedFlags() & VRING_USED_F_NO_NOTIFY, 0);
    drv.addBuffer([wr(BUF, 8)]);
    drv.publish();
    assert.equal(drv.kickNeeded(), true);
  }
});

Deno.test("popOrArm returns a buffer published while it armed notifications, not POP_EMPTY", () => {
  for (const eventIdx of [true, false]) {
    const l = compactRingLayout(8, RING_BASE, eventIdx);
    // The arm's store: avail_event (EVENT_IDX) or used.flags.
    const armGpa = eventIdx ? l.usedGpa + 4 + 8 * 8 : l.usedGpa;
    let inject = 0;
    let injected = -1;
    const s: Setup = setup({
      eventIdx,
      onDirty(gpa) {
        // The driver, between the device's empty check and its re-read, adds a buffer; it
        // saw notifications off (or avail_event stale), so it will never kick for it.
        if (gpa !== armGpa || inject === 0) return;
        if (!eventIdx && (s.drv.readUsedFlags() & VRING_USED_F_NO_NOTIFY) !== 0) return;
        inject--;
        injected = s.drv.addBuffer([wr(BUF + 0x100, 32)]);
        s.drv.publish();
      },
    });
    const { drv, dev, chain } = s;
    drv.addBuffer([wr(BUF, 8)]);
    drv.publish();
    dev.disableNotification();
    assert.equal(dev.popOrArm(chain), POP_CHAIN);
    inject = 1;
    assert.equal(dev.popOrArm(chain), POP_CHAIN, `EVENT_IDX ${eventIdx}: the re-check`);
    assert.equal(chain.head, injected);
    assert.equal(chain.writableLen, 32);
    assert.equal(inject, 0);
    // Now it is really empty: armed, POP_EMPTY.
    assert.equal(dev.popOrArm(chain), POP_EMPTY);
    if (eventIdx) assert.equal(drv.readAvailEvent(), 2);
    else assert.equal(drv.readUsedFlags() & VRING_USED_F_NO_NOTIFY, 0);
  }
});

Deno.test("popOrArm on a broken ring yields nothing and does not spin", () => {
  const { drv, dev, chain } = setup({ eventIdx: true });
  drv.setAvailIdxRaw(100);
  assert.equal(dev.popOrArm(chain), POP_EMPTY);
  assert.notEqual(dev.broken, null);
  assert.equal(dev.popOrArm(chain), POP_EMPTY);
});
