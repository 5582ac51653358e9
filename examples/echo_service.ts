/**
 * A host-side echo service for guests: listens on `<uds-path>_<port>`, the
 * socket a guest connect to CID 2 port <port> reaches.
 *
 *   deno run -A examples/echo_service.ts /tmp/vm3.vsock 5000
 *   (in the guest)  echo hi | socat - VSOCK-CONNECT:2:5000
 */
const [udsPath = "/tmp/vm3.vsock", port = "5000"] = Deno.args;
const path = `${udsPath}_${port}`;
try {
  Deno.removeSync(path);
} catch { /* not there */ }
const listener = Deno.listen({ transport: "unix", path });
console.error(`echo service on ${path} (guest: connect to CID 2 port ${port})`);
for await (const conn of listener) {
  (async () => {
    try {
      await conn.readable.pipeTo(conn.writable);
    } catch { /* peer reset */ }
  })();
}
