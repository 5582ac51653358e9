/**
 * `perf script` samples of the profile of the back end: a sample is charged to what its chain
 * does (a wake-up deferred to `pvm_irq_enable` is still a wake-up), memcpy in user space is a
 * copy, JIT frames are JS, and a context switch names the call it happened in.
 */
import assert from "node:assert/strict";
import { categorize, innermostJs, parseSamples, userCall } from "./perf_samples.ts";

const K = "[kernel.kallsyms]";
const OUT = `worker-1 18266/18281     500250 
\t          16d9f6 __memmove_avx512_unaligned_erms (/usr/lib/x86_64-linux-gnu/libc.so.6)
\t         369e4f6 [unknown] (/work/node_modules/deno/deno)
\t    7f39a0055857 JS:*'queueToHost file:///w/lib/vsock/connection.ts:254:134 (/tmp/perf-18266.map)
\t    7f39a00c652c JS:+'#guestData file:///w/lib/vsock/connection.ts:199:13 (/tmp/perf-18266.map)

worker-1 18266/18281     500250 
\tffffffff811 pvm_irq_enable (${K})
\tffffffff812 _raw_spin_unlock_irqrestore (${K})
\tffffffff813 sock_def_readable (${K})
\tffffffff814 unix_stream_sendmsg (${K})
\t          f838f __GI___libc_write (/usr/lib/x86_64-linux-gnu/libc.so.6)

deno 18235/18235     500250 
\tffffffff821 _copy_to_iter (${K})
\tffffffff822 unix_stream_read_generic (${K})

deno 18235/18235     500250 
\tffffffff831 fdget_pos (${K})
\tffffffff832 do_syscall_64 (${K})

deno 18235/18235     500250 
\t    7f39a00c5c68 JS:+'sink file:///w/tests/bench/host_app_proc.ts:146:91 (/tmp/perf-18235.map)

deno 18235/18235     500250 
\t         35ea2bb [unknown] (/work/node_modules/deno/deno)
`;

Deno.test("perf samples: parsed per process, charged to what the chain does", () => {
  const s = parseSamples(OUT);
  assert.deepEqual(s.map((x) => x.pid), [18266, 18266, 18235, 18235, 18235, 18235]);
  assert.equal(s[0].comm, "worker-1");
  assert.deepEqual(s.map((x) => categorize(x.frames)), [
    "copy",
    "wake-up/scheduling",
    "copy",
    "syscall/socket",
    "JS",
    "V8/FFI",
  ]);
  assert.equal(innermostJs(s[0].frames), "queueToHost connection.ts");
  assert.equal(innermostJs(s[4].frames), "sink host_app_proc.ts");
  assert.equal(innermostJs(s[2].frames), "-");
});

Deno.test("perf samples: a context switch names its call and state", () => {
  const [s] = parseSamples(
    `worker-1 25720/25732 prev_comm=worker-1 prev_pid=25732 prev_prio=120 prev_state=R ==> next_comm=deno next_pid=25737 next_prio=120
\tffffffff82248208 __schedule (${K})
\tffffffff82248b73 schedule (${K})
\t           f838f __GI___libc_write (/usr/lib/x86_64-linux-gnu/libc.so.6)
`,
  );
  assert.equal(s.pid, 25720);
  assert.match(s.text, /prev_state=R /);
  assert.equal(userCall(s.frames), "write");
});
