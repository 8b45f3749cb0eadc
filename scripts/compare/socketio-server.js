// The Socket.IO v4 deployment Shoal is compared with (`make compare`):
// WebSocket transport only, events join(room, ack) and pub(room, body, ack);
// every member of the room, the sender included, gets msg(room, body).
// With REDIS_URL, nodes share rooms through @socket.io/redis-adapter, the
// way Socket.IO clusters are run. Listens on 127.0.0.1:$PORT only.
'use strict';
const http = require('http');
const { Server } = require('socket.io');

async function main() {
  const port = Number(process.env.PORT || 3000);
  const server = http.createServer((req, res) => {
    res.statusCode = req.url === '/health' ? 200 : 404;
    res.end();
  });
  const io = new Server(server, { transports: ['websocket'], serveClient: false });
  if (process.env.REDIS_URL) {
    const { createClient } = require('redis');
    const { createAdapter } = require('@socket.io/redis-adapter');
    const pub = createClient({ url: process.env.REDIS_URL });
    const sub = pub.duplicate();
    await Promise.all([pub.connect(), sub.connect()]);
    io.adapter(createAdapter(pub, sub));
  }
  io.on('connection', (socket) => {
    socket.on('join', (room, ack) => {
      socket.join(String(room));
      if (typeof ack === 'function') ack();
    });
    socket.on('pub', (room, body, ack) => {
      io.to(String(room)).emit('msg', room, body);
      if (typeof ack === 'function') ack();
    });
  });
  server.listen(port, '127.0.0.1');
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
