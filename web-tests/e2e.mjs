// End-to-end tests of the Shoal web client: a real broker (the binary cargo
// built) on a free loopback port in a temp dir, two headless Chromium
// contexts driven by playwright-core. Run by `make test` (scripts/web-tests.sh).
//
//   SHOAL_BIN=target/debug/shoal node web-tests/e2e.mjs
import { spawn } from 'node:child_process';
import { mkdtempSync, mkdirSync, rmSync, copyFileSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const repo = join(here, '..');
const BIN = process.env.SHOAL_BIN || join(repo, 'target/debug/shoal');
const BROWSER = process.env.CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = join(here, 'artifacts');
const SECRET = 'web-test-secret-web-test-secret-0123456';
const API_KEY = 'web-test-api-key-0123456789';
const T = 15000;

function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => res(p)); });
    s.on('error', rej);
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

class Broker {
  constructor(port, data) { this.port = port; this.data = data; this.proc = null; }
  get url() { return `http://127.0.0.1:${this.port}`; }
  async start() {
    this.proc = spawn(BIN, ['--listen', `127.0.0.1:${this.port}`, '--data', this.data, '--log', 'warn'], {
      env: { ...process.env, SHOAL_JWT_SECRET: SECRET, SHOAL_API_KEY: API_KEY, SHOAL_ADMINS: 'ops' },
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    for (let i = 0; i < 100; i++) {
      try { if ((await fetch(this.url + '/health')).ok) return; } catch (_) { /* not up yet */ }
      await sleep(100);
    }
    throw new Error('broker did not start');
  }
  async stop() {
    if (!this.proc) return;
    const p = this.proc;
    this.proc = null;
    const done = new Promise((r) => p.once('exit', r));
    p.kill('SIGTERM');
    await Promise.race([done, sleep(15000)]);
    if (p.exitCode === null) p.kill('SIGKILL');
  }
}

async function publishApi(broker, room, text) {
  const r = await fetch(broker.url + '/api/publish', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: 'Bearer ' + API_KEY },
    body: JSON.stringify({ room, body: { text } }),
  });
  if (r.status !== 201) throw new Error('publish api ' + r.status);
}

async function signUp(page, url, user) {
  await page.goto(url);
  await page.fill('#username', user);
  await page.fill('#password', 'password123');
  await page.click('#register');
  await page.waitForSelector('#app:not([hidden])', { timeout: T });
  await page.waitForSelector('#conn.connected', { timeout: T });
}

async function logIn(page, url, user) {
  await page.goto(url);
  await page.fill('#username', user);
  await page.fill('#password', 'password123');
  await page.press('#password', 'Enter');
  await page.waitForSelector('#conn.connected', { timeout: T });
}

async function openRoom(page, name) {
  await page.fill('#join-room', name);
  await page.press('#join-room', 'Enter');
  await page.waitForFunction((n) => document.getElementById('room-title').textContent.includes(n), name, { timeout: T });
}

async function say(page, text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter'); // keyboard only
}

const logTexts = (page) => page.$$eval('#log .msg .text', (els) => els.map((e) => e.textContent));

async function expectText(page, text) {
  try {
    await page.waitForFunction(
      (t) => [...document.querySelectorAll('#log .msg:not(.pending) .text')].some((e) => e.textContent === t),
      text, { timeout: T });
  } catch (e) {
    const state = await page.evaluate(() => ({
      conn: document.getElementById('conn').textContent,
      room: document.getElementById('room-title').textContent,
      log: [...document.querySelectorAll('#log > *')].map((m) => m.className + ': ' + m.textContent).slice(-8),
    }));
    throw new Error(`"${text}" not shown: ${JSON.stringify(state)}`);
  }
}

let failures = 0;
async function check(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
    console.log(`ok   ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    failures++;
    console.log(`FAIL ${name}: ${e.stack || e}`);
  }
}

function assert(cond, msg) { if (!cond) throw new Error(msg); }

async function main() {
  mkdirSync(ARTIFACTS, { recursive: true });
  const tmp = mkdtempSync(join(tmpdir(), 'shoal-web-'));
  const broker = new Broker(await freePort(), join(tmp, 'data'));
  await broker.start();
  const browser = await chromium.launch({
    executablePath: BROWSER,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const dialogs = [];
  const ctxA = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const ctxB = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const a = await ctxA.newPage();
  const b = await ctxB.newPage();
  for (const p of [a, b]) {
    p.on('dialog', (d) => { dialogs.push(d.message()); d.dismiss(); });
    p.on('pageerror', (e) => { failures++; console.log('page error: ' + e.message); });
  }

  try {
    await check('register, log in, join a room, exchange messages in order', async () => {
      await signUp(a, broker.url, 'alice');
      await signUp(b, broker.url, 'bob');
      await openRoom(a, 'general');
      await openRoom(b, 'general');
      await say(a, 'hello bob');
      await expectText(b, 'hello bob');
      await say(b, 'hi alice');
      await expectText(a, 'hi alice');
      for (let i = 1; i <= 3; i++) await say(a, `line ${i}`);
      await expectText(b, 'line 3');
      const got = (await logTexts(b)).filter((t) => t.startsWith('line') || t.startsWith('h'));
      assert(JSON.stringify(got) === JSON.stringify(['hello bob', 'hi alice', 'line 1', 'line 2', 'line 3']),
        'order on bob: ' + JSON.stringify(got));
    });

    await check('typing indicator and presence', async () => {
      await sleep(2100); // the client sends `typing` at most every 2 s
      await b.type('#text', 'typing…');
      await a.waitForFunction(() => document.getElementById('typing').textContent.includes('bob is typing'), null, { timeout: T });
      await b.fill('#text', '');
      await a.waitForSelector('#members li[data-member="bob"] .dot.online', { timeout: T });
      await a.waitForSelector('#users li[data-user="bob"] .dot.online', { timeout: T });
    });

    await check('read marks turn to read when the other side views the room', async () => {
      await say(a, 'did you read this?');
      await expectText(b, 'did you read this?');
      await a.waitForFunction(() => {
        const own = [...document.querySelectorAll('#log .msg.own')].find((m) => m.querySelector('.text').textContent === 'did you read this?');
        return own && own.querySelector('.status').textContent.includes('read');
      }, null, { timeout: T });
    });

    await check('message text is rendered as text, never as HTML', async () => {
      const evil = '<img src=x onerror=alert(1)>';
      await say(a, evil);
      await expectText(b, evil);
      assert((await b.$$('#log img')).length === 0, 'an <img> element was created');
      await sleep(300);
      assert(dialogs.length === 0, 'a dialog opened: ' + dialogs.join(','));
    });

    await check('DM arrives without joining; kept while logged out and there at next login', async () => {
      await a.click('#users li[data-user="bob"]');
      await a.waitForFunction(() => document.getElementById('room-title').textContent.includes('bob'), null, { timeout: T });
      await say(a, 'psst, private');
      await b.waitForSelector('#rooms li[data-room="dm:alice:bob"]', { timeout: T });
      await b.click('#rooms li[data-room="dm:alice:bob"]');
      await expectText(b, 'psst, private');
      // Bob logs out; alice writes; bob logs back in and finds it.
      await b.click('#logout');
      await b.waitForSelector('#auth:not([hidden])', { timeout: T });
      // Signed out, only the sign-in card shows (no empty chat layout under it).
      assert(!(await b.isVisible('#app')), 'the chat layout is still shown after logout');
      await say(a, 'while you were away');
      await expectText(a, 'while you were away');
      await logIn(b, broker.url, 'bob');
      await b.waitForSelector('#rooms li[data-room="dm:alice:bob"] .badge', { timeout: T });
      await b.click('#rooms li[data-room="dm:alice:bob"]');
      await expectText(b, 'while you were away');
    });

    await check('broker restart: the page shows it is reconnecting, reconnects, shows what was sent meanwhile', async () => {
      await openRoom(a, 'general');
      await openRoom(b, 'general');
      await broker.stop();
      await a.waitForSelector('#conn.reconnecting', { timeout: T });
      await broker.start();
      await publishApi(broker, 'general', 'sent during the outage');
      await publishApi(broker, 'general', 'and another one');
      await a.waitForSelector('#conn.connected', { timeout: 30000 });
      await b.waitForSelector('#conn.connected', { timeout: 30000 });
      await expectText(a, 'sent during the outage');
      await expectText(a, 'and another one');
      await say(a, 'back online');
      await expectText(b, 'back online');
    });

    await check('search and delete own message', async () => {
      await a.click('#users li[data-user="bob"]');
      await a.fill('#search-q', 'private');
      await a.press('#search-q', 'Enter');
      await a.waitForFunction(() => document.getElementById('search-results').textContent.includes('psst, private'), null, { timeout: T });
      await openRoom(a, 'general');
      await say(a, 'delete me');
      await expectText(b, 'delete me');
      const own = a.locator('#log .msg.own', { hasText: 'delete me' });
      await own.locator('button.del').click();
      await b.waitForFunction(() => ![...document.querySelectorAll('#log .msg .text')].some((e) => e.textContent === 'delete me'), null, { timeout: T });
    });

    await check('WebSocket blocked: the page chats over Socket.IO long-polling and says so', async () => {
      // As behind a proxy that refuses upgrades: every WebSocket fails
      // before it opens.
      const ctxC = await browser.newContext({ viewport: { width: 1100, height: 720 } });
      await ctxC.addInitScript(() => {
        window.WebSocket = class {
          constructor() {
            this.readyState = 3;
            setTimeout(() => {
              if (this.onerror) this.onerror(new Event('error'));
              if (this.onclose) this.onclose({ code: 1006, reason: '' });
            }, 10);
          }
          send() {}
          close() {}
        };
        window.WebSocket.OPEN = 1;
      });
      const c = await ctxC.newPage();
      c.on('pageerror', (e) => { failures++; console.log('page error: ' + e.message); });
      try {
        await signUp(c, broker.url, 'carol');
        await c.waitForFunction(() => document.getElementById('conn').textContent.includes('long-polling'), null, { timeout: T });
        await openRoom(c, 'general');
        await openRoom(b, 'general');
        await say(c, 'over long-polling');
        await expectText(b, 'over long-polling');
        await say(b, 'heard you, carol');
        await expectText(c, 'heard you, carol');
        // Its own message was acked (no pending or failed mark left).
        await c.waitForFunction(() => {
          const own = [...document.querySelectorAll('#log .msg.own')].find((m) => m.querySelector('.text').textContent === 'over long-polling');
          return own && !own.classList.contains('pending') && !own.classList.contains('failed');
        }, null, { timeout: T });
      } finally {
        await ctxC.close();
      }
    });

    await check("PROTOCOL.md's Socket.IO snippet works as written", async () => {
      // The snippet is read from the document, so it cannot rot.
      const md = readFileSync(join(repo, 'proto/PROTOCOL.md'), 'utf8');
      const html = md.split('## 8. Socket.IO clients')[1].split('```html')[1].split('```')[0];
      const code = [...html.matchAll(/<script>([\s\S]*?)<\/script>/g)].map((m) => m[1]).join('\n');
      assert(code.includes("socket.emit('pub'"), 'snippet found');
      const reg = await fetch(broker.url + '/api/register', { method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ username: 'dora', password: 'password123' }) });
      assert(reg.ok, 'register dora');
      const login = await (await fetch(broker.url + '/api/login', { method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ username: 'dora', password: 'password123' }) })).json();
      const ctxD = await browser.newContext({ bypassCSP: true });
      const d = await ctxD.newPage();
      const logs = [];
      d.on('console', (m) => logs.push(m.text()));
      try {
        await d.goto(broker.url);
        await d.addScriptTag({ url: '/vendor/socket.io.min.js' });
        await d.evaluate(([src, token]) => { new Function('TOKEN', src)(token); }, [code, login.token]);
        const deadline = Date.now() + T;
        while (Date.now() < deadline && !(logs.some((l) => /^stored as #\d+$/.test(l)) && logs.some((l) => /^#\d+ dora: \{"text":"hello"\}$/.test(l)))) await sleep(50);
        assert(logs.some((l) => /^stored as #\d+$/.test(l)), 'acked: ' + JSON.stringify(logs));
        assert(logs.some((l) => /^#\d+ dora: \{"text":"hello"\}$/.test(l)), 'received: ' + JSON.stringify(logs));
      } finally {
        await ctxD.close();
      }
    });

    await check('@shoal/client in a browser page (served at /vendor/shoal-client.js, JSON frames)', async () => {
      const ctxE = await browser.newContext({ bypassCSP: true });
      const e = await ctxE.newPage();
      try {
        await e.goto(broker.url);
        const reg = await fetch(broker.url + '/api/register', { method: 'POST', headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({ username: 'erin', password: 'password123' }) });
        assert(reg.ok, 'register erin');
        const login = await (await fetch(broker.url + '/api/login', { method: 'POST', headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({ username: 'erin', password: 'password123' }) })).json();
        const got = await e.evaluate(async ([url, token]) => {
          const { connect } = await import('/vendor/shoal-client.js');
          const c = connect({ url, token, encoding: 'json' });
          const room = c.join('browser-lib');
          const seen = [];
          room.on('message', (m) => seen.push(m.body));
          await room.ready;
          const ack = await room.publish({ text: 'from the library' });
          for (let i = 0; i < 100 && seen.length === 0; i++) await new Promise((r) => setTimeout(r, 20));
          c.close();
          return { seq: ack.seq, seen };
        }, [broker.url, login.token]);
        assert(got.seq === 1, 'acked as seq 1: ' + JSON.stringify(got));
        assert(JSON.stringify(got.seen) === JSON.stringify([{ text: 'from the library' }]), 'received: ' + JSON.stringify(got));
      } finally {
        await ctxE.close();
      }
    });

    const msgByText = (page, text) => page.locator('#log .msg', { has: page.locator('.text', { hasText: new RegExp(`^${text}$`) }) });

    await check('edit own message: the other side shows the new text, marked edited', async () => {
      await openRoom(a, 'general');
      await openRoom(b, 'general');
      await say(a, 'tpyo here');
      await expectText(b, 'tpyo here');
      await msgByText(a, 'tpyo here').locator('button.edit').click();
      assert((await a.inputValue('#text')) === 'tpyo here', 'the composer holds the text to edit');
      await a.fill('#text', 'typo fixed');
      await a.press('#text', 'Enter');
      await expectText(b, 'typo fixed');
      await msgByText(b, 'typo fixed').locator('.edited').waitFor({ timeout: T });
      assert(!(await logTexts(b)).includes('tpyo here'), 'the old text is gone');
    });

    await check('a reaction count changes live on both sides', async () => {
      const chip = (page) => msgByText(page, 'typo fixed').locator('.reactions button[data-emoji="👍"]');
      await msgByText(b, 'typo fixed').locator('button.react').click();
      await msgByText(b, 'typo fixed').locator('.picker button', { hasText: '👍' }).click();
      for (const p of [a, b]) await chip(p).filter({ hasText: '👍 1' }).waitFor({ timeout: T });
      await chip(a).click(); // alice adds hers
      for (const p of [a, b]) await chip(p).filter({ hasText: '👍 2' }).waitFor({ timeout: T });
      await chip(b).click(); // bob takes his back
      for (const p of [a, b]) await chip(p).filter({ hasText: '👍 1' }).waitFor({ timeout: T });
      assert(await chip(a).evaluate((e) => e.classList.contains('me')), "alice's own reaction is marked");
    });

    await check('reply with a quote, and the thread panel', async () => {
      await msgByText(b, 'typo fixed').locator('button.reply').click();
      await b.waitForSelector('#compose-bar:not([hidden])', { timeout: T });
      await say(b, 'replying here');
      await expectText(a, 'replying here');
      await msgByText(a, 'replying here').locator('.quote', { hasText: 'typo fixed' }).waitFor({ timeout: T });
      await msgByText(a, 'typo fixed').locator('button.replies', { hasText: '1 reply' }).click();
      await a.waitForSelector('#thread:not([hidden])', { timeout: T });
      await a.locator('#thread-log .msg .text', { hasText: 'replying here' }).waitFor({ timeout: T });
      await a.click('#thread-close');
    });

    await check('mention autocomplete, highlight for the one mentioned, and a mention badge', async () => {
      await openRoom(b, 'side');
      await openRoom(b, 'general');
      await openRoom(a, 'side');
      await a.waitForSelector('#members li[data-member="bob"]', { timeout: T });
      await a.fill('#text', '');
      await a.type('#text', 'hey @bo');
      await a.locator('#mention-pop li[data-name="bob"]').waitFor({ timeout: T });
      await a.press('#text', 'Tab');
      assert((await a.inputValue('#text')) === 'hey @bob ', 'completed: ' + await a.inputValue('#text'));
      await a.type('#text', 'look');
      await a.press('#text', 'Enter');
      await b.locator('#rooms li[data-room="side"] .badge.mention').waitFor({ timeout: T });
      await b.click('#rooms li[data-room="side"]');
      await b.locator('#log .msg .mention.me', { hasText: '@bob' }).waitFor({ timeout: T });
      assert(!(await a.locator('#log .msg .mention.me').count()), 'alice sees the mention, not highlighted as hers');
      await openRoom(b, 'general');
      await openRoom(a, 'general');
    });

    await check('an attached image appears as a preview on the other side; a refused file says why', async () => {
      const png = Buffer.from('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==', 'base64');
      await a.setInputFiles('#file', { name: 'dot.png', mimeType: 'image/png', buffer: png });
      const img = b.locator('#log .msg .file img[alt="dot.png"]');
      await img.waitFor({ timeout: T });
      await b.waitForFunction(() => [...document.querySelectorAll('#log .msg .file img')].some((i) => i.complete && i.naturalWidth === 1), null, { timeout: T });
      await a.setInputFiles('#file', { name: 'tool.exe', mimeType: 'application/x-msdownload', buffer: Buffer.from('MZ not really') });
      await a.locator('#log .notice', { hasText: 'Could not attach tool.exe' }).waitFor({ timeout: T });
    });

    await check('a notification for a DM or a mention while the page is hidden, none while it is visible', async () => {
      const ctxN = await browser.newContext({ viewport: { width: 1100, height: 720 } });
      await ctxN.grantPermissions(['notifications'], { origin: broker.url });
      await ctxN.addInitScript(() => {
        // Chromium's own Notification, its constructions recorded; the
        // page's visibility under the test's control.
        window.__notes = [];
        const N = window.Notification;
        window.Notification = new Proxy(N, {
          construct(t, args) { window.__notes.push(args[0]); return Reflect.construct(t, args); },
          get(t, p) { const v = Reflect.get(t, p, t); return typeof v === 'function' ? v.bind(t) : v; },
        });
        window.__hidden = false;
        Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => (window.__hidden ? 'hidden' : 'visible') });
      });
      const n = await ctxN.newPage();
      n.on('pageerror', (e) => { failures++; console.log('page error: ' + e.message); });
      try {
        await signUp(n, broker.url, 'nora');
        assert(await n.evaluate(() => Notification.permission) === 'granted', 'permission granted');
        await openRoom(n, 'general');
        // Alice's people list learns of nora when it is next refreshed.
        await a.reload();
        await a.waitForSelector('#conn.connected', { timeout: T });
        await a.click('#users li[data-user="nora"]');
        await say(a, 'visible dm');
        await n.locator('#rooms li[data-room="dm:alice:nora"]').waitFor({ timeout: T });
        await sleep(300);
        assert((await n.evaluate(() => window.__notes.length)) === 0, 'no notification while visible');
        await n.evaluate(() => { window.__hidden = true; document.dispatchEvent(new Event('visibilitychange')); });
        await say(a, 'hidden dm');
        await n.waitForFunction(() => window.__notes.length === 1, null, { timeout: T });
        await openRoom(a, 'general');
        await say(a, 'hey @nora look');
        await n.waitForFunction(() => window.__notes.length === 2, null, { timeout: T });
        const notes = await n.evaluate(() => window.__notes);
        assert(/alice/.test(notes[0]) && /mentioned you/.test(notes[1]), JSON.stringify(notes));
        await say(a, 'no mention, no notification');
        await sleep(400);
        assert((await n.evaluate(() => window.__notes.length)) === 2, 'only DMs and mentions notify');
      } finally {
        await ctxN.close();
      }
    });

    await check('a private room: created, entered by invite only, a member removed from the members list', async () => {
      await a.fill('#create-room', 'secret');
      await a.check('#create-private');
      await a.click('#create-form button[type="submit"]');
      await a.waitForFunction(() => document.getElementById('room-title').textContent.includes('secret'), null, { timeout: T });
      await a.waitForFunction(() => document.getElementById('room-topic').textContent.includes('🔒'), null, { timeout: T });
      // Not invited: refused, and the page says why.
      await openRoom(b, 'secret');
      await b.locator('#log .notice', { hasText: 'private room' }).waitFor({ timeout: T });
      await a.locator('#invite-form:not([hidden])').waitFor({ timeout: T });
      await a.fill('#invite-user', 'bob');
      await a.press('#invite-user', 'Enter');
      await a.locator('#log .notice', { hasText: 'alice invited bob' }).waitFor({ timeout: T });
      await openRoom(b, 'secret');
      await say(b, 'hi in secret');
      await expectText(a, 'hi in secret');
      // The owner removes bob from the members list; both pages say so.
      await a.locator('#members li[data-member="bob"] button.kick').click();
      await b.locator('#log .notice', { hasText: 'You were removed from this room.' }).waitFor({ timeout: T });
      await a.locator('#log .notice', { hasText: 'alice removed bob' }).waitFor({ timeout: T });
      await openRoom(b, 'general');
      await openRoom(a, 'general');
    });

    await check('the admin console lists a live connection and disconnects it; the client says so', async () => {
      const reg = await fetch(broker.url + '/api/register', { method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ username: 'ops', password: 'password123' }) });
      assert(reg.ok, 'register ops');
      const ctxO = await browser.newContext({ viewport: { width: 1200, height: 800 } });
      const o = await ctxO.newPage();
      o.on('pageerror', (e) => { failures++; console.log('page error: ' + e.message); });
      try {
        await o.goto(broker.url + '/admin');
        await o.fill('#a-user', 'ops');
        await o.fill('#a-pass', 'password123');
        await o.press('#a-pass', 'Enter');
        const row = o.locator('#conns tbody tr[data-user="bob"]').first();
        await row.waitFor({ timeout: T });
        assert((await row.textContent()).includes('general'), 'rooms listed: ' + await row.textContent());
        await row.locator('button', { hasText: 'Disconnect' }).click();
        await b.waitForFunction(() => document.getElementById('conn').textContent.includes('disconnected by an operator'), null, { timeout: T });
        await o.locator('#audit li', { hasText: 'disconnect' }).first().waitFor({ timeout: T });
        // A chat user is not an operator.
        const denied = await a.evaluate(async () => (await fetch('/api/admin/overview', {
          headers: { Authorization: 'Bearer ' + sessionStorage.getItem('shoal.token') } })).status);
        assert(denied === 403, 'non-operator got ' + denied);
      } finally {
        await ctxO.close();
      }
      await b.reload();
      await b.waitForSelector('#conn.connected', { timeout: T });
      await openRoom(b, 'general');
    });

    await check('narrow phone-sized window stays usable', async () => {
      await a.setViewportSize({ width: 380, height: 740 });
      await say(a, 'from my phone');
      await expectText(b, 'from my phone');
      const box = await a.locator('#text').boundingBox();
      assert(box && box.x >= 0 && box.x + box.width <= 380, 'input off screen: ' + JSON.stringify(box));
      await a.setViewportSize({ width: 1100, height: 720 });
    });

    await a.screenshot({ path: join(ARTIFACTS, 'chat.png') });
    if (process.env.UPDATE_SCREENSHOT) copyFileSync(join(ARTIFACTS, 'chat.png'), join(repo, 'docs/screenshot.png'));
  } finally {
    await browser.close();
    await broker.stop();
    rmSync(tmp, { recursive: true, force: true });
  }
  if (failures) {
    console.log(`${failures} failure(s)`);
    process.exit(1);
  }
  console.log('all web tests passed');
}

main().catch((e) => { console.error(e); process.exit(1); });
