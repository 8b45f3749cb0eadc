// @shoal/client against a real broker (the debug `shoal` binary, or
// SHOAL_BIN) on a free loopback port in a temp dir, stopped by PID.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';
import { connect, ShoalError } from '../src/index.js';

const repo = join(dirname(fileURLToPath(import.meta.url)), '../../..');
const BIN = process.env.SHOAL_BIN || join(repo, 'target/debug/shoal');
const SECRET = 'js-client-test-secret-0123456789-abcdef';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => res(p)); });
    s.on('error', rej);
  });
}

class Broker {
  constructor(port, data) { this.port = port; this.data = data; this.proc = null; }
  get url() { return `http://127.0.0.1:${this.port}`; }
  async start() {
    this.proc = spawn(BIN, ['--listen', `127.0.0.1:${this.port}`, '--data', this.data, '--log', 'warn',
      '--rate-limit', '100000', '--rate-burst', '100000', '--namespace', 'short:retain_messages=5', '--retention-interval', '1'], {
      env: { ...process.env, SHOAL_JWT_SECRET: SECRET },
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    for (let i = 0; i < 100; i++) {
      try { if ((await fetch(this.url + '/health')).ok) return; } catch (_) { /* not up yet */ }
      await sleep(100);
    }
    throw new Error('broker did not start');
  }
  async stop(signal = 'SIGTERM') {
    if (!this.proc) return;
    const p = this.proc;
    this.proc = null;
    const done = new Promise((r) => p.once('exit', r));
    p.kill(signal);
    await Promise.race([done, sleep(15000)]);
    if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
  }
}

let broker;
let tmp;
const users = new Map();

async function token(user) {
  if (!users.has(user)) {
    const body = JSON.stringify({ username: user, password: 'password123' });
    const headers = { 'Content-Type': 'application/json' };
    await fetch(broker.url + '/api/register', { method: 'POST', headers, body });
    const r = await fetch(broker.url + '/api/login', { method: 'POST', headers, body });
    users.set(user, (await r.json()).token);
  }
  return users.get(user);
}

async function client(user, opts = {}) {
  const c = connect({ url: broker.url, token: await token(user), WebSocket, backoffMin: 100, backoffMax: 500, ...opts });
  await until(() => c.state === 'connected', `${user} connected`);
  return c;
}

async function until(pred, what, ms = 10000) {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out: ${what}`);
    await sleep(10);
  }
}

before(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'shoal-js-'));
  broker = new Broker(await freePort(), join(tmp, 'data'));
  await broker.start();
});

after(async () => {
  await broker.stop();
  rmSync(tmp, { recursive: true, force: true });
});

for (const encoding of ['msgpack', 'json']) {
  test(`every API call over ${encoding}`, async () => {
    const a = await client(`ann${encoding}`, { encoding });
    const b = await client(`bob${encoding}`, { encoding });
    const room = `api-${encoding}`;
    const ra = a.join(room);
    const rb = b.join(room);
    await Promise.all([ra.ready, rb.ready]);
    const got = [];
    rb.on('message', (m) => got.push(m));
    const typing = [];
    ra.on('typing', (t) => typing.push(t));
    const marks = [];
    ra.on('mark', (m) => marks.push(m));
    const ack = await ra.publish({ text: 'hello' });
    assert.equal(ack.room, room);
    assert.equal(ack.seq, 1);
    await until(() => got.length === 1, 'bob got it');
    assert.deepEqual(got[0].body, { text: 'hello' });
    assert.equal(got[0].from, `ann${encoding}`);
    rb.typing();
    await until(() => typing.length === 1, 'typing');
    rb.mark(1, 'read');
    await until(() => marks.length === 1, 'mark');
    const m = await ra.members();
    assert.deepEqual(m.users, [`ann${encoding}`, `bob${encoding}`]);
    assert.equal(m.receipts.find((r) => r.user === `bob${encoding}`).read, 1);
    await ra.publish('two');
    const h = await rb.history({ limit: 1 });
    assert.equal(h.messages.length, 1);
    assert.equal(h.messages[0].seq, 2);
    assert.equal(h.more, true);
    const deleted = [];
    rb.on('deleted', (d) => deleted.push(d));
    await ra.delete(2);
    await until(() => deleted.length === 1, 'deleted');
    await assert.rejects(rb.delete(1), (e) => e instanceof ShoalError && e.code === 404);
    const dms = [];
    b.on('dm', (d) => dms.push(d));
    const dm = await a.dm(`bob${encoding}`, 'psst');
    assert.ok(dm.room.startsWith('dm:'));
    await until(() => dms.length === 1, 'dm');
    await assert.rejects(a.dm('nobody-here', 'x'), (e) => e.code === 404);
    await rb.leave();
    a.close();
    b.close();
  });
}

for (const encoding of ['msgpack', 'json']) {
  test(`chat features over ${encoding}: edits, reactions, replies, threads, mentions; recovered with since`, async () => {
    const [an, bo] = [`fa${encoding}`, `fb${encoding}`];
    const a = await client(an, { encoding });
    const b = await client(bo, { encoding });
    const room = `features-${encoding}`;
    const ra = a.join(room);
    const rb = b.join(room);
    await Promise.all([ra.ready, rb.ready]);
    const seen = [];
    const watch = (r, out) => {
      r.on('message', (m) => out.push(['message', m.seq, m.reply_to ? m.reply_to.seq : 0, (m.mentions || []).join(',')]));
      r.on('edit', (e) => out.push(['edit', e.seq, e.body.text]));
      r.on('reaction', (x) => out.push([x.on ? 'react' : 'unreact', x.seq, x.emoji, x.user]));
      r.on('deleted', (d) => out.push(['deleted', d.seq, d.at ? 'event' : 'replayed']));
    };
    watch(rb, seen);
    const m1 = await ra.publish({ text: `hello @${bo} and @nobody` });
    const m2 = await rb.publish({ text: 'replying' }, { replyTo: m1.seq });
    const e1 = await ra.edit(m1.seq, { text: 'hello (edited)' });
    assert.ok(e1.seq > m2.seq, 'an edit is an entry of its own');
    await rb.react(m1.seq, '👍');
    await until(() => seen.length === 4, `live: ${JSON.stringify(seen)}`);
    assert.deepEqual(seen, [
      ['message', m1.seq, 0, bo],
      ['message', m2.seq, m1.seq, ''],
      ['edit', m1.seq, 'hello (edited)'],
      ['react', m1.seq, '👍', bo],
    ]);
    // Refusals: someone else's message, a second identical reaction, a
    // reply to nothing, a reaction too long.
    await assert.rejects(rb.edit(m1.seq, 'mine now'), (e) => e.code === 404);
    await assert.rejects(rb.react(m1.seq, '👍'), (e) => e.code === 409);
    await assert.rejects(rb.publish('x', { replyTo: 999 }), (e) => e.code === 404);
    await assert.rejects(rb.react(m1.seq, 'x'.repeat(33)), (e) => e.code === 400);

    // Bob goes away; everything that happens meanwhile comes back with since.
    const since = rb.lastSeq;
    b.close();
    await ra.edit(m1.seq, { text: 'hello again' });
    await ra.react(m1.seq, '🎉');
    const m3 = await ra.publish({ text: 'second reply' }, { replyTo: m1.seq });
    await ra.delete(m3.seq);
    const b2 = await client(bo, { encoding });
    const back = [];
    const rb2 = b2.join(room, { since });
    watch(rb2, back);
    await rb2.ready;
    await until(() => back.length === 4, `recovered: ${JSON.stringify(back)}`);
    await sleep(200);
    // m3 was deleted before bob saw it: replayed as deleted at its own
    // seq, then its deletion event follows at the event's seq.
    assert.deepEqual(back, [
      ['edit', m1.seq, 'hello again'],
      ['react', m1.seq, '🎉', an],
      ['deleted', m3.seq, 'replayed'],
      ['deleted', m3.seq, 'event'],
    ]);
    await rb2.unreact(m1.seq, '👍');

    // A fresh reader's history shows the current state.
    const h = await rb2.history({ limit: 10 });
    const first = h.messages.find((m) => m.seq === m1.seq);
    assert.equal(first.body.text, 'hello again');
    assert.ok(first.edited_ts >= first.ts);
    assert.deepEqual(first.reactions, [{ emoji: '🎉', count: 1, me: false }]);
    assert.deepEqual(first.thread, { count: 1, last_seq: m2.seq, last_ts: first.thread.last_ts });
    assert.deepEqual(first.mentions, [bo]);
    assert.equal(h.messages.some((m) => m.seq === m3.seq), false, 'deleted reply gone');
    const t = await rb2.thread(m1.seq);
    assert.deepEqual(t.messages.map((m) => m.seq), [m2.seq]);
    assert.equal(t.messages[0].reply_to.preview, `hello @${bo} and @nobody`);
    // Previous versions over REST, oldest first.
    const v = await (await fetch(`${broker.url}/api/rooms/${room}/messages/${m1.seq}/edits`, {
      headers: { Authorization: `Bearer ${await token(bo)}` },
    })).json();
    assert.deepEqual(v.versions.map((x) => x.body.text), [`hello @${bo} and @nobody`, 'hello (edited)']);
    // The mention counts as one for bob until he reads it.
    const rooms = await (await fetch(`${broker.url}/api/rooms`, { headers: { Authorization: `Bearer ${await token(bo)}` } })).json();
    assert.equal(rooms.rooms.find((r) => r.room === room).mentions, 1);
    a.close();
    b2.close();
  });
}

test('created rooms: private until invited, moderation entries, removal', async () => {
  const a = await client('modowner');
  const b = await client('modguest');
  await a.create('club-js', { private: true, topic: 'members only' });
  await assert.rejects(a.create('club-js'), (e) => e.code === 409);
  const ra = a.join('club-js');
  const seen = [];
  ra.on('moderation', (m) => seen.push([m.kind, m.user || null]));
  await ra.ready;
  await assert.rejects(b.join('club-js').ready, (e) => e.code === 403);
  await ra.moderate('invite', { user: 'modguest' });
  const rb = b.join('club-js');
  const removed = [];
  rb.on('removed', (r) => removed.push(r.reason));
  await rb.ready;
  await ra.moderate('mute', { user: 'modguest' });
  await assert.rejects(rb.publish('hi'), (e) => e.code === 403);
  await ra.moderate('kick', { user: 'modguest', reason: 'test' });
  await until(() => removed.length === 1, 'bob told he was removed');
  assert.deepEqual(removed, ['kick']);
  assert.equal(b.rooms.has('club-js'), false, 'not joined again on reconnect');
  await until(() => seen.length === 3, `moderation seen: ${JSON.stringify(seen)}`);
  assert.deepEqual(seen, [['invite', 'modguest'], ['mute', 'modguest'], ['kick', 'modguest']]);
  await assert.rejects(ra.moderate('dance', { user: 'x' }), (e) => e.code === 400);
  a.close();
  b.close();
});

test('a broker restart mid-stream: every seq exactly once, in order', async () => {
  const sub = await client('sub');
  const pub = await client('pub');
  const room = 'restart';
  const seen = [];
  const rs = sub.join(room);
  rs.on('message', (m) => seen.push(m.seq));
  const rp = pub.join(room);
  await Promise.all([rs.ready, rp.ready]);
  const states = [];
  sub.on('disconnected', (d) => states.push(d));
  const n = 60;
  const acks = [];
  for (let i = 1; i <= n; i++) {
    acks.push(rp.publish(i).then((a) => a.seq));
    if (i === 25) {
      await broker.stop('SIGKILL');
      await broker.start();
    }
    await sleep(5);
  }
  const seqs = await Promise.all(acks);
  assert.equal(new Set(seqs).size, n, 'every publish acked with its own seq');
  await until(() => seen.length >= n, `subscriber saw ${seen.length} of ${n}`, 20000);
  await sleep(200);
  assert.deepEqual(seen, Array.from({ length: n }, (_, i) => i + 1));
  assert.ok(states.length >= 1 && states[0].willRetry, 'told it was disconnected and will retry');
  sub.close();
  pub.close();
});

test('a publish retried after a dropped connection is one message', async () => {
  const c = await client('retry');
  const watcher = await client('watcher');
  const room = 'cid';
  const seen = [];
  const rw = watcher.join(room);
  rw.on('message', (m) => seen.push(m));
  const r = c.join(room);
  await Promise.all([rw.ready, r.ready]);
  // Send, then drop the socket before the ack can arrive.
  const p = r.publish('once');
  c._ws.terminate();
  const ack = await p;
  await until(() => seen.length >= 1, 'delivered');
  await sleep(300);
  assert.equal(seen.length, 1, 'delivered once');
  assert.equal(seen[0].seq, ack.seq);
  c.close();
  watcher.close();
});

// A WebSocket that fails before it opens, as behind a proxy refusing upgrades.
class BlockedWebSocket {
  constructor() {
    this.readyState = 3;
    setTimeout(() => this.onclose?.({ code: 1006, reason: '' }), 5);
  }
  send() {}
  close() {}
}
const loadIo = async () => (await import('socket.io-client')).io;

test('WebSocket blocked: falls back to Socket.IO long-polling; same API, recovery across a restart', async () => {
  const p = await client('poller', { WebSocket: BlockedWebSocket, transports: ['websocket', 'polling'], io: loadIo, encoding: 'json' });
  assert.equal(p.transport, 'polling');
  const n = await client('native');
  const room = 'polled';
  const seen = [];
  const rp = p.join(room);
  rp.on('message', (m) => seen.push(m.seq));
  const rn = n.join(room);
  await Promise.all([rp.ready, rn.ready]);
  const mine = await rp.publish({ text: 'over polling' });
  assert.equal(mine.seq, 1);
  await rn.publish('from native');
  await until(() => seen.length === 2, 'both delivered to the poller');
  const m = await rp.members();
  assert.deepEqual(m.users, ['native', 'poller']);
  const h = await rp.history({ limit: 5 });
  assert.deepEqual(h.messages.map((x) => x.seq), [2, 1]);
  await assert.rejects(rp.delete(2), (e) => e instanceof ShoalError && e.code === 404);
  await assert.rejects(p.dm('nobody-here', 'x'), (e) => e.code === 404);
  // kill -9 and restart: the poller re-joins with since and misses nothing.
  await broker.stop('SIGKILL');
  await broker.start();
  await until(() => n.state === 'connected' && p.state === 'connected', 'both back');
  await rn.ready;
  for (let i = 0; i < 5; i++) await rn.publish(i);
  await until(() => seen.length >= 7, `poller saw ${seen.length} of 7`, 15000);
  await sleep(200);
  assert.deepEqual(seen, [1, 2, 3, 4, 5, 6, 7]);
  assert.equal(p.transport, 'polling');
  p.close();
  n.close();
});

test('over long-polling, a revoked token stops retrying', async () => {
  const t = await token('pollleaver');
  const c = connect({ url: broker.url, token: t, transports: ['polling'], io: loadIo, encoding: 'json', backoffMin: 50, backoffMax: 100 });
  await until(() => c.state === 'connected', 'connected');
  const ends = [];
  c.on('disconnected', (d) => ends.push(d));
  await fetch(broker.url + '/api/logout', { method: 'POST', headers: { Authorization: `Bearer ${t}` } });
  await until(() => ends.length === 1, 'disconnected');
  assert.deepEqual([ends[0].code, ends[0].willRetry], [4002, false]);
  await sleep(300);
  assert.equal(c.state, 'closed');
});

// An HS256 token signed with the broker's secret, as an issuer would.
function mint(sub, ttlSecs) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub, iat: now, exp: now + ttlSecs })}`;
  return `${head}.${createHmac('sha256', SECRET).update(head).digest('base64url')}`;
}

test('an expired token (4001) is refreshed through getToken; the room carries on', async () => {
  await token('refresher');
  let asked = 0;
  const c = connect({ url: broker.url, WebSocket, backoffMin: 50, backoffMax: 100, getToken: () => { asked++; return mint('refresher', 2); } });
  await until(() => c.state === 'connected', 'connected');
  const ends = [];
  c.on('disconnected', (d) => ends.push(d));
  const r = c.join('refresh');
  const seen = [];
  r.on('message', (m) => seen.push(m.body));
  await r.ready;
  const w = await client('refreshwriter');
  const rw = w.join('refresh');
  await rw.ready;
  await rw.publish('before');
  await until(() => ends.length >= 1, 'closed when the token expired', 5000);
  assert.deepEqual([ends[0].code, ends[0].willRetry], [4001, true]);
  await rw.publish('during');
  await until(() => c.state === 'connected', 'reconnected with a fresh token');
  assert.ok(asked >= 2, `getToken asked ${asked} times`);
  await rw.publish('after');
  await until(() => seen.length >= 3, `saw ${JSON.stringify(seen)}`);
  assert.deepEqual(seen.slice(0, 3), ['before', 'during', 'after']);
  c.close();
  w.close();
});

test('a revoked token stops retrying', async () => {
  const t = await token('leaver');
  const c = connect({ url: broker.url, token: t, WebSocket, backoffMin: 50, backoffMax: 100 });
  await until(() => c.state === 'connected', 'connected');
  const ends = [];
  c.on('disconnected', (d) => ends.push(d));
  const r = await fetch(broker.url + '/api/logout', { method: 'POST', headers: { Authorization: `Bearer ${t}` } });
  assert.equal(r.status, 200);
  await until(() => ends.length === 1, 'disconnected');
  assert.deepEqual([ends[0].code, ends[0].willRetry], [4002, false]);
  await sleep(500);
  assert.equal(c.state, 'closed');
  assert.equal(ends.length, 1, 'no reconnect attempt');
});

test('a gap surfaces to the app', async () => {
  const w = await client('writer');
  const room = 'short:gappy';
  const rw = w.join(room);
  await rw.ready;
  for (let i = 1; i <= 20; i++) await rw.publish(i);
  // Retention (every second here) keeps the newest 5.
  await sleep(1500);
  const late = await client('late');
  const gaps = [];
  const msgs = [];
  const r = late.join(room, { since: 0 });
  r.on('gap', (g) => gaps.push(g));
  r.on('message', (m) => msgs.push(m.seq));
  await r.ready;
  await until(() => gaps.length >= 1, 'gap');
  assert.equal(gaps[0].from, 1);
  assert.ok(gaps[0].to >= 1 && gaps[0].to < 20);
  await until(() => msgs.length >= 1, 'replay after the gap');
  assert.equal(msgs[msgs.length - 1], 20);
  assert.ok(msgs[0] > gaps[0].to, 'the replay starts after the gap');
  // A room the user may not join: its `ready` rejects with 403.
  await assert.rejects(late.join('dm:aaa:bbb').ready, (e) => e.code === 403);
  w.close();
  late.close();
});

test('bounded: publishes past maxPending are refused at once', async () => {
  const c = connect({ url: broker.url, token: await token('bounded'), WebSocket, maxPending: 2 });
  await until(() => c.state === 'connected', 'connected');
  const r = c.join('bounded');
  await r.ready;
  const ps = [r.publish(1), r.publish(2)];
  await assert.rejects(r.publish(3), /already wait/);
  await Promise.all(ps);
  c.close();
});

test('npm pack ships the module, its types and README, and the exports resolve', async () => {
  // Self-reference through package.json's `exports`, as an app imports it.
  const self = await import('@shoal/client');
  assert.equal(typeof self.connect, 'function');
  assert.equal(typeof self.ShoalError, 'function');
  const here = dirname(fileURLToPath(import.meta.url));
  const [pack] = JSON.parse(execFileSync('npm', ['pack', '--dry-run', '--json'], { cwd: join(here, '..'), encoding: 'utf8' }));
  const files = pack.files.map((f) => f.path).sort();
  assert.deepEqual(files, ['README.md', 'index.d.ts', 'package.json', 'src/index.js']);
  assert.equal(pack.name, '@shoal/client');
});
