// Link probes for bench/replication.mjs, run inside the benchmark's network namespaces (one process per end):
//   node netprobe.mjs serve HOST PORT          echo server (writes back what it reads); prints "ready" once listening;
//                                              a connection that ends is answered with one byte (the sink's receipt)
//   node netprobe.mjs rtt HOST PORT COUNT      QD1 ping-pong of 24-byte frames (the size of the link's acks),
//                                              prints {"p50Us","p99Us"} as JSON
//   node netprobe.mjs send HOST PORT MIB       streams MIB MiB in 1 MiB writes, waits for the receipt after the
//                                              peer has read everything, prints {"MiBps"} as JSON
// Node.js at both ends with TCP_NODELAY, as the replication link is.
import * as net from 'node:net';

const [mode, host, portText, countText] = process.argv.slice(2);
const port = Number(portText);

function percentile(values, fraction) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * fraction))];
}

async function connect() {
  const socket = net.connect(port, host);
  socket.setNoDelay(true);
  await new Promise((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  return socket;
}

if (mode === 'serve') {
  const server = net.createServer((socket) => {
    socket.setNoDelay(true);
    let sink = false;
    socket.on('data', (data) => {
      // A first chunk larger than a ping frame marks a throughput connection: read, do not echo.
      if (!sink && data.length > 64) sink = true;
      if (!sink) socket.write(data);
    });
    socket.on('end', () => socket.end(Buffer.from('x')));
    socket.on('error', () => {});
  });
  server.listen(port, host, () => console.log('ready'));
} else if (mode === 'rtt') {
  const socket = await connect();
  const count = Number(countText);
  const message = Buffer.alloc(24);
  const samples = [];
  for (let i = 0; i < count + 100; i += 1) {
    const start = process.hrtime.bigint();
    await new Promise((resolve) => {
      let got = 0;
      const onData = (data) => {
        got += data.length;
        if (got >= message.length) {
          socket.off('data', onData);
          resolve();
        }
      };
      socket.on('data', onData);
      socket.write(message);
    });
    if (i >= 100) samples.push(Number(process.hrtime.bigint() - start) / 1000); // the first 100 warm up
  }
  socket.destroy();
  console.log(JSON.stringify({ p50Us: percentile(samples, 0.5), p99Us: percentile(samples, 0.99) }));
} else if (mode === 'send') {
  const socket = await connect();
  const totalMiB = Number(countText);
  const chunk = Buffer.alloc(1024 * 1024, 1);
  const receipt = new Promise((resolve) => socket.once('data', resolve));
  const start = process.hrtime.bigint();
  for (let sent = 0; sent < totalMiB; sent += 1) {
    if (!socket.write(chunk)) await new Promise((resolve) => socket.once('drain', resolve));
  }
  socket.end();
  await receipt;
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  socket.destroy();
  console.log(JSON.stringify({ MiBps: totalMiB / seconds }));
} else {
  console.error(`netprobe: unknown mode ${mode}`);
  process.exit(2);
}
