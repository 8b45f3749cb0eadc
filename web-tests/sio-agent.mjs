// A Socket.IO client app driven by the broker's Rust integration tests
// (broker/tests/socketio.rs): the stock socket.io-client 4.8 (and
// socket.io-msgpack-parser), controlled over stdin/stdout with one JSON
// command per line and one JSON reply per line, in order.
//
// Each named client records every event it receives and, like the app in
// PROTOCOL.md's snippet, remembers the last seq seen per room and re-joins
// every room with `since` when it (re)connects: that is the recovery a
// Socket.IO app does, and what the tests check end to end.
//
// Commands ({op, ...}):
//   connect {as, url, path?, ns?, token?, query?, transports?, parser?, rejoin?}
//       -> {ok, transport} | {error}
//   emit {as, event, args, ack?, timeout?}  -> {ack: [...]} | {sent} | {error}
//   events {as, name?, count, timeout?}     -> {events: [[name, ...args]]} (removed)
//   status {as}                             -> {connected, transport, rejoins, last}
//   disconnected {as, timeout?}             -> {reason} | {error}
//   close {as}                              -> {ok}
import { createInterface } from 'node:readline';
import { io } from 'socket.io-client';
import msgpackParser from 'socket.io-msgpack-parser';

const clients = new Map();

function client(name) {
  const c = clients.get(name);
  if (!c) throw new Error(`no client ${name}`);
  return c;
}

function waitFor(pred, timeout) {
  return new Promise((resolve, reject) => {
    const start = Date.now();
    const tick = () => {
      const v = pred();
      if (v !== undefined) return resolve(v);
      if (Date.now() - start > timeout) return reject(new Error('timeout'));
      setTimeout(tick, 5);
    };
    tick();
  });
}

async function connect(cmd) {
  const c = {
    events: [],
    last: {},
    rooms: new Set(),
    rejoins: 0,
    disconnects: [],
    rejoin: cmd.rejoin !== false,
  };
  const opts = {
    path: cmd.path || '/socket.io',
    transports: cmd.transports || ['polling', 'websocket'],
    reconnectionDelay: 100,
    reconnectionDelayMax: 500,
    timeout: 5000,
  };
  if (cmd.token !== undefined) opts.auth = { token: cmd.token };
  if (cmd.query) opts.query = cmd.query;
  // The tests' nginx has a self-signed certificate.
  if (cmd.insecure) opts.rejectUnauthorized = false;
  if (cmd.parser === 'msgpack') opts.parser = msgpackParser;
  const s = io(cmd.url + (cmd.ns && cmd.ns !== '/' ? cmd.ns : ''), opts);
  c.socket = s;
  s.onAny((name, ...args) => {
    c.events.push([name, ...args]);
    const m = args[0];
    if (name === 'msg' || name === 'deleted') {
      c.last[m.room] = Math.max(c.last[m.room] || 0, m.seq);
    }
    if (name === 'gap') c.last[m.room] = Math.max(c.last[m.room] || 0, m.to);
    if (name === 'close' && m && m.reconnect) {
      // The server said why and that coming back is fine.
      s.once('disconnect', () => setTimeout(() => s.connect(), 100));
    }
  });
  s.on('disconnect', (reason) => c.disconnects.push(reason));
  s.on('connect', async () => {
    if (!c.rejoin || c.rooms.size === 0 || !c.connectedOnce) {
      c.connectedOnce = true;
      return;
    }
    c.rejoins += 1;
    for (const room of c.rooms) {
      s.emit('join', room, c.last[room] || 0);
    }
  });
  clients.set(cmd.as, c);
  try {
    await new Promise((resolve, reject) => {
      s.once('connect', resolve);
      s.once('connect_error', reject);
    });
  } catch (e) {
    s.close();
    return { error: e.message };
  }
  return { ok: true, transport: s.io.engine.transport.name };
}

async function emit(cmd) {
  const c = client(cmd.as);
  const args = cmd.args || [];
  if (cmd.event === 'join' && typeof args[0] === 'string') c.rooms.add(args[0]);
  if (!cmd.ack) {
    c.socket.emit(cmd.event, ...args);
    return { sent: true };
  }
  try {
    const ack = await c.socket.timeout(cmd.timeout || 5000).emitWithAck(cmd.event, ...args);
    if (cmd.event === 'join' && ack && typeof ack.seq === 'number' && typeof args[0] === 'string') {
      c.last[args[0]] = Math.max(c.last[args[0]] || 0, typeof args[1] === 'number' ? args[1] : 0);
    }
    return { ack };
  } catch (e) {
    return { error: e.message };
  }
}

async function events(cmd) {
  const c = client(cmd.as);
  const match = (e) => !cmd.name || e[0] === cmd.name;
  try {
    await waitFor(() => (c.events.filter(match).length >= cmd.count ? true : undefined), cmd.timeout || 5000);
  } catch {
    // Return what there is; the test asserts on it.
  }
  const got = [];
  c.events = c.events.filter((e) => {
    if (match(e) && got.length < cmd.count) {
      got.push(e);
      return false;
    }
    return true;
  });
  return { events: got };
}

async function handle(cmd) {
  switch (cmd.op) {
    case 'connect':
      return connect(cmd);
    case 'emit':
      return emit(cmd);
    case 'events':
      return events(cmd);
    case 'status': {
      const c = client(cmd.as);
      return {
        connected: c.socket.connected,
        transport: c.socket.io.engine ? c.socket.io.engine.transport.name : null,
        rejoins: c.rejoins,
        last: c.last,
        disconnects: c.disconnects,
      };
    }
    case 'disconnected': {
      const c = client(cmd.as);
      try {
        await waitFor(() => (c.disconnects.length > 0 ? true : undefined), cmd.timeout || 5000);
        return { reason: c.disconnects[0] };
      } catch (e) {
        return { error: e.message };
      }
    }
    case 'close': {
      const c = client(cmd.as);
      c.socket.close();
      return { ok: true };
    }
    default:
      return { error: `unknown op ${cmd.op}` };
  }
}

const rl = createInterface({ input: process.stdin });
// Commands run one at a time, replies in order.
let chain = Promise.resolve();
rl.on('line', (line) => {
  chain = chain.then(async () => {
    let reply;
    try {
      reply = await handle(JSON.parse(line));
    } catch (e) {
      reply = { error: String(e && e.message ? e.message : e) };
    }
    process.stdout.write(JSON.stringify(reply) + '\n');
  });
});
rl.on('close', () => {
  chain.then(() => {
    for (const c of clients.values()) c.socket.close();
    process.exit(0);
  });
});
