/**
 * A host app talking to a guest service through the hybrid socket:
 * `CONNECT <port>\n`, wait for `OK <host-port>\n`, then a byte stream.
 *
 *   deno run -A examples/host_client.ts /tmp/vm3.vsock 1234 "hello guest"
 */
const [udsPath = "/tmp/vm3.vsock", port = "1234", message = "hello guest\n"] = Deno.args;
const conn = await Deno.connect({ transport: "unix", path: udsPath });
await conn.write(new TextEncoder().encode(`CONNECT ${port}\n`));
const buf = new Uint8Array(4096);
let line = "";
while (!line.includes("\n")) {
  const n = await conn.read(buf);
  if (n === null) throw new Error("the guest refused the connection (socket closed)");
  line += new TextDecoder().decode(buf.subarray(0, n));
}
const nl = line.indexOf("\n");
console.error(`connected: ${line.slice(0, nl)}`);
// bytes the guest sent right after accepting may have come with the OK line
if (nl + 1 < line.length) await Deno.stdout.write(new TextEncoder().encode(line.slice(nl + 1)));
await conn.write(new TextEncoder().encode(message));
await conn.closeWrite();
for (;;) {
  const n = await conn.read(buf);
  if (n === null) break;
  await Deno.stdout.write(buf.subarray(0, n));
}
conn.close();
