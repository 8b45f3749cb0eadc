// Shoal web chat: plain JavaScript over shoal.v1.json (see proto/PROTOCOL.md).
// Every piece of peer-supplied text goes into the page with textContent,
// never innerHTML, so messages can't inject markup or scripts.
'use strict';

const $ = (id) => document.getElementById(id);
const S = {
  token: sessionStorage.getItem('shoal.token'),
  user: sessionStorage.getItem('shoal.user'),
  ws: null,
  sio: null,            // Socket.IO socket when on the long-polling fallback
  polling: false,       // a WebSocket could not be opened: use long-polling
  closeCode: 0,         // the close code a Socket.IO `close` event gave
  connected: false,
  attempt: 0,
  nextId: 1,
  waiting: new Map(),   // request id -> {resolve, reject}
  rooms: new Map(),     // name -> room state
  active: null,
  pending: new Map(),   // cid -> {room, body, el, id, timer}
  users: [],
  lastTypingSent: 0,
  reconnectTimer: null,
};

function room(name) {
  let r = S.rooms.get(name);
  if (!r) {
    r = { name, msgs: new Map(), lastSeq: 0, oldest: null, more: true, unread: 0,
          joined: false, joining: null, online: new Set(), receipts: new Map(), typing: new Map() };
    S.rooms.set(name, r);
  }
  return r;
}

function dmPeer(name) {
  if (!name.startsWith('dm:')) return null;
  const [, a, b] = name.split(':');
  return a === S.user ? b : a;
}
function dmName(peer) { return 'dm:' + [S.user, peer].sort().join(':'); }
function label(name) { const p = dmPeer(name); return p ? '@ ' + p : '# ' + name; }
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function bodyText(body) {
  if (typeof body === 'string') return body;
  if (body && typeof body.text === 'string') return body.text;
  return JSON.stringify(body);
}

// ---------- REST ----------
async function api(method, path, body) {
  const headers = { 'Content-Type': 'application/json' };
  if (S.token) headers.Authorization = 'Bearer ' + S.token;
  const r = await fetch(path, { method, headers, body: body ? JSON.stringify(body) : undefined });
  const v = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(v.message || ('HTTP ' + r.status));
  return v;
}

async function auth(register) {
  const username = $('username').value.trim();
  const password = $('password').value;
  $('auth-error').textContent = '';
  try {
    if (register) await api('POST', '/api/register', { username, password });
    const v = await api('POST', '/api/login', { username, password });
    S.token = v.token; S.user = v.username;
    sessionStorage.setItem('shoal.token', S.token);
    sessionStorage.setItem('shoal.user', S.user);
    start();
  } catch (e) {
    $('auth-error').textContent = e.message;
  }
}

async function logout() {
  try { await api('POST', '/api/logout'); } catch (_) { /* token may be gone already */ }
  stop();
}

function stop() {
  sessionStorage.removeItem('shoal.token');
  sessionStorage.removeItem('shoal.user');
  S.token = S.user = null;
  clearTimeout(S.reconnectTimer);
  if (S.ws) { S.ws.onclose = null; S.ws.close(1000); S.ws = null; }
  if (S.sio) { S.sio.off(); S.sio.offAny(); S.sio.disconnect(); S.sio = null; }
  S.rooms.clear(); S.pending.clear(); S.active = null;
  $('app').hidden = true; $('auth').hidden = false; $('logout').hidden = true;
  $('me').textContent = ''; $('log').replaceChildren(); $('rooms').replaceChildren();
  setConn('offline', 'offline');
}

function start() {
  $('auth').hidden = true; $('app').hidden = false; $('logout').hidden = false;
  $('me').textContent = S.user;
  connect();
  refreshRooms();
  refreshUsers();
}

async function refreshRooms() {
  try {
    const v = await api('GET', '/api/rooms');
    for (const r of v.rooms) {
      const st = room(r.room);
      // Unread as the server counts it, unless we are looking at the room.
      if (S.active !== r.room) st.unread = r.unread;
      st.serverLast = r.last_seq;
    }
    renderRooms();
  } catch (_) { /* offline: keep what we have */ }
}

async function refreshUsers() {
  try { S.users = (await api('GET', '/api/users')).users; renderUsers(); } catch (_) { /* retry later */ }
}

// ---------- WebSocket ----------
function setConn(cls, text) { const c = $('conn'); c.className = 'conn ' + cls; c.textContent = text; }

// The native WebSocket (/ws, JSON frames) first. If a WebSocket cannot be
// opened at all (a proxy that blocks upgrades), fall back to Socket.IO
// long-polling (/socket.io/, the stock client the broker serves), which
// carries the same frames as events (PROTOCOL.md, "Socket.IO clients").
function connect() {
  if (S.polling) return connectPolling();
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(`${proto}//${location.host}/ws?token=${encodeURIComponent(S.token)}`, 'shoal.v1.json');
  S.ws = ws;
  let opened = false;
  setConn('reconnecting', S.attempt ? 'reconnecting…' : 'connecting…');
  ws.onopen = () => { opened = true; };
  ws.onmessage = (ev) => { let f; try { f = JSON.parse(ev.data); } catch (_) { return; } onFrame(f); };
  ws.onclose = (ev) => {
    S.ws = null;
    // Never opened, and the server answers HTTP: WebSocket is blocked on
    // the way, not the server down. Try long-polling at once.
    if (!opened && ev.code === 1006 && !S.polling) {
      fetch('/health').then((r) => {
        if (r.ok || r.status === 503) { S.polling = true; connect(); } else closed(ev.code);
      }, () => closed(ev.code));
      return;
    }
    closed(ev.code);
  };
}

// What a request's ack callback answers with, as the native reply frame.
const REPLY = { join: 'joined', leave: 'left', pub: 'ack', members: 'members', history: 'history', delete: 'deleted', ping: 'pong' };

function connectPolling() {
  if (!window.io) {
    const sc = document.createElement('script');
    sc.src = '/vendor/socket.io.min.js';
    sc.onload = connectPolling;
    sc.onerror = () => closed(1006);
    document.head.appendChild(sc);
    return;
  }
  setConn('reconnecting', S.attempt ? 'reconnecting (long-polling)…' : 'connecting (long-polling)…');
  S.closeCode = 0;
  // One sticky key per tab, so a load balancer keeps every poll on one node.
  let key = sessionStorage.getItem('shoal.sid');
  if (!key) { key = Math.random().toString(36).slice(2); sessionStorage.setItem('shoal.sid', key); }
  const s = window.io({ path: '/socket.io', transports: ['polling'], auth: { token: S.token },
    query: { shoal_sid: key }, reconnection: false });
  S.sio = s;
  s.onAny((name, payload) => {
    if (name === 'close') { S.closeCode = payload.code; return; }
    onFrame({ ...payload, t: name });
  });
  s.on('connect_error', (e) => {
    S.sio = null;
    closed(/revoked|expired/.test(e.message) ? 4002 : 1006);
  });
  s.on('disconnect', () => { S.sio = null; closed(S.closeCode || 1006); });
}

// The connection is gone: fail what waited, then reconnect with backoff
// (or sign out when the session ended).
function closed(code) {
  S.connected = false;
  for (const w of S.waiting.values()) w.reject(new Error('disconnected'));
  S.waiting.clear();
  for (const r of S.rooms.values()) { r.joined = false; r.joining = null; r.online.clear(); }
  for (const [cid, p] of S.pending) if (!p.failed) failPending(cid, 'connection lost');
  if (code === 4001 || code === 4002) { stop(); $('auth-error').textContent = 'Session ended; please log in again.'; return; }
  // Backoff with full jitter: 0.5 s doubling to 15 s.
  const cap = Math.min(15000, 500 * 2 ** S.attempt++);
  const delay = cap / 2 + Math.random() * cap / 2;
  setConn('reconnecting', `reconnecting in ${(delay / 1000).toFixed(1)} s…`);
  S.reconnectTimer = setTimeout(connect, delay);
}

function send(frame) {
  if (S.sio) {
    if (!S.sio.connected) return false;
    const { t, id, ...fields } = frame;
    if (id === undefined) { S.sio.emit(t, fields); return true; }
    S.sio.emit(t, fields, (reply) => {
      if (reply && reply.error) onFrame({ t: 'error', id, ...reply.error });
      else if (REPLY[t]) onFrame({ ...reply, t: REPLY[t], id });
    });
    return true;
  }
  if (!S.ws || S.ws.readyState !== WebSocket.OPEN) return false;
  S.ws.send(JSON.stringify(frame));
  return true;
}

function request(frame) {
  const id = S.nextId++;
  frame.id = id;
  return new Promise((resolve, reject) => {
    S.waiting.set(id, { resolve, reject });
    if (!send(frame)) { S.waiting.delete(id); reject(new Error('offline')); }
  });
}

function onFrame(f) {
  if (f.id !== undefined && S.waiting.has(f.id) && f.t !== 'ack') {
    const w = S.waiting.get(f.id); S.waiting.delete(f.id);
    if (f.t === 'error') w.reject(new Error(f.message)); else w.resolve(f);
  }
  switch (f.t) {
    case 'hello':
      S.connected = true; S.attempt = 0;
      setConn('connected', S.sio ? 'connected (long-polling)' : 'connected');
      // Re-join everything we had, from the last seq we saw: nothing missed.
      for (const r of S.rooms.values()) if (r.wanted) joinRoom(r.name);
      for (const [cid, p] of S.pending) if (p.auto) sendPending(cid);
      refreshRooms(); refreshUsers();
      break;
    case 'msg': onMsg(f); break;
    case 'ack': onAck(f); break;
    case 'error': onError(f); break;
    case 'deleted': onDeleted(f); break;
    case 'mark': onMark(f); break;
    case 'typing': onTyping(f); break;
    case 'presence': onPresence(f); break;
    case 'gap': addNotice(f.room, `Messages ${f.from}–${f.to} are no longer available.`); break;
    default: break;
  }
}

async function joinRoom(name) {
  const r = room(name);
  r.wanted = true;
  if (r.joined) return;
  if (r.joining) return r.joining;
  const fresh = r.lastSeq === 0;
  r.joining = (async () => {
    const frame = { t: 'join', room: name };
    if (!fresh) frame.since = r.lastSeq;
    const j = await request(frame);
    r.joined = true;
    if (fresh) r.lastSeq = Math.max(r.lastSeq, j.seq);
    if (r.msgs.size < 30) await loadOlder(name);
    const m = await request({ t: 'members', room: name });
    r.online = new Set(m.users);
    for (const rc of m.receipts || []) r.receipts.set(rc.user, rc);
    if (S.active === name) { renderMembers(); renderStatuses(name); }
  })().catch((e) => {
    // Disconnected meanwhile: `hello` re-joins everything still wanted.
    if (!S.connected) return;
    addNotice(name, 'Could not join: ' + e.message);
    r.wanted = false;
  })
    .finally(() => { r.joining = null; });
  return r.joining;
}

async function loadOlder(name) {
  const r = room(name);
  if (!r.more || r.loadingOlder) return;
  r.loadingOlder = true;
  try {
    const frame = { t: 'history', room: name, limit: 30 };
    if (r.oldest !== null) frame.before = r.oldest;
    const h = await request(frame);
    r.more = h.more;
    const log = $('log');
    const before = log.scrollHeight;
    for (const m of h.messages) addMsg(name, { seq: m.seq, from: m.from, ts: m.ts, body: m.body }, false);
    if (S.active === name) {
      if (frame.before === undefined) log.scrollTop = log.scrollHeight;
      else log.scrollTop += log.scrollHeight - before;
    }
  } catch (_) { /* offline; scrolling up again retries */ }
  r.loadingOlder = false;
}

// ---------- messages ----------
function msgEl(name, m) {
  const own = m.from === S.user;
  const d = el('div', 'msg' + (own ? ' own' : ''));
  d.dataset.seq = m.seq;
  if (!own) d.append(el('div', 'from', m.from));
  d.append(el('div', 'text', bodyText(m.body)));
  const meta = el('div', 'meta');
  meta.append(el('time', '', new Date(m.ts).toLocaleTimeString()));
  if (own) {
    meta.append(el('span', 'status', '✓'));
    const del = el('button', 'del', 'Delete');
    del.type = 'button';
    del.setAttribute('aria-label', 'Delete this message');
    del.onclick = () => request({ t: 'delete', room: name, seq: m.seq }).catch((e) => addNotice(name, e.message));
    meta.append(del);
  }
  d.append(meta);
  return d;
}

function addMsg(name, m, live) {
  const r = room(name);
  if (r.msgs.has(m.seq)) return;
  r.msgs.set(m.seq, m);
  r.lastSeq = Math.max(r.lastSeq, m.seq);
  r.oldest = r.oldest === null ? m.seq : Math.min(r.oldest, m.seq);
  if (S.active !== name) return;
  const log = $('log');
  const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 30;
  const node = msgEl(name, m);
  // Keep the log in seq order whatever order history and live frames came in.
  const after = [...log.querySelectorAll('.msg[data-seq]')].find((e) => Number(e.dataset.seq) > m.seq);
  if (after) log.insertBefore(node, after);
  else {
    const firstPending = log.querySelector('.msg.pending, .msg.failed');
    log.insertBefore(node, firstPending);
  }
  updateStatus(name, node, m.seq);
  if (live && atBottom) log.scrollTop = log.scrollHeight;
}

function onMsg(f) {
  const r = room(f.room);
  const isNew = !r.msgs.has(f.seq);
  addMsg(f.room, f, true);
  if (!isNew || f.from === S.user) { renderRooms(); return; }
  if (S.active === f.room && document.visibilityState === 'visible') markRead(f.room);
  else {
    r.unread++;
    // Tell the sender it reached a device (✓✓), even if not read yet.
    if (r.joined) send({ t: 'mark', room: f.room, seq: f.seq, state: 'delivered' });
  }
  r.typing.delete(f.from); renderTyping();
  renderRooms();
}

let readTimer = null;
function markRead(name) {
  clearTimeout(readTimer);
  readTimer = setTimeout(() => {
    const r = room(name);
    if (!r.joined || r.lastSeq === 0 || r.readSent >= r.lastSeq) return;
    r.readSent = r.lastSeq;
    send({ t: 'mark', room: name, seq: r.lastSeq, state: 'read' });
  }, 150);
}

function onDeleted(f) {
  const r = room(f.room);
  r.msgs.delete(f.seq);
  if (S.active === f.room) { const e = $('log').querySelector(`.msg[data-seq="${f.seq}"]`); if (e) e.remove(); }
}

function onMark(f) {
  const r = room(f.room);
  const cur = r.receipts.get(f.user) || { user: f.user, delivered: 0, read: 0 };
  if (f.state === 'read') { cur.read = Math.max(cur.read, f.seq); cur.delivered = Math.max(cur.delivered, f.seq); }
  else cur.delivered = Math.max(cur.delivered, f.seq);
  r.receipts.set(f.user, cur);
  if (S.active === f.room) { renderStatuses(f.room); renderMembers(); }
}

function updateStatus(name, node, seq) {
  const s = node.querySelector('.status');
  if (!s) return;
  const r = room(name);
  let delivered = false, read = false;
  for (const [u, rc] of r.receipts) {
    if (u === S.user) continue;
    if (rc.read >= seq) read = true;
    if (rc.delivered >= seq) delivered = true;
  }
  s.textContent = read ? '✓✓ read' : delivered ? '✓✓' : '✓';
  s.className = 'status' + (read ? ' read' : '');
  s.setAttribute('aria-label', read ? 'read' : delivered ? 'delivered' : 'sent');
}
function renderStatuses(name) {
  for (const node of $('log').querySelectorAll('.msg.own[data-seq]')) updateStatus(name, node, Number(node.dataset.seq));
}

// ---------- sending (optimistic, idempotent retry with cid) ----------
function sendText(text) {
  const name = S.active;
  if (!name || !text.trim()) return;
  const cid = (crypto.randomUUID ? crypto.randomUUID() : String(Math.random())).replace(/-/g, '').slice(0, 32);
  const d = el('div', 'msg own pending');
  d.append(el('div', 'text', text));
  const meta = el('div', 'meta');
  meta.append(el('span', 'status', 'sending…'));
  d.append(meta);
  $('log').append(d);
  $('log').scrollTop = $('log').scrollHeight;
  S.pending.set(cid, { room: name, body: { text }, el: d, auto: true });
  sendPending(cid);
}

function sendPending(cid) {
  const p = S.pending.get(cid);
  if (!p) return;
  p.failed = false;
  p.el.className = 'msg own pending';
  const st = p.el.querySelector('.status'); st.textContent = 'sending…';
  p.el.querySelector('.retry')?.remove();
  p.id = S.nextId++;
  const peer = dmPeer(p.room);
  const frame = { t: 'pub', id: p.id, cid, body: p.body };
  if (peer) frame.to = peer; else frame.room = p.room;
  clearTimeout(p.timer);
  p.timer = setTimeout(() => failPending(cid, 'no answer'), 10000);
  if (!send(frame)) failPending(cid, 'offline');
}

function failPending(cid, why) {
  const p = S.pending.get(cid);
  if (!p) return;
  clearTimeout(p.timer);
  p.failed = true; p.auto = false;
  p.el.className = 'msg own failed';
  p.el.querySelector('.status').textContent = 'not sent (' + why + ')';
  if (!p.el.querySelector('.retry')) {
    const b = el('button', 'retry', 'Retry');
    b.type = 'button';
    b.onclick = () => sendPending(cid);
    p.el.querySelector('.meta').append(b);
  }
}

function onAck(f) {
  for (const [cid, p] of S.pending) {
    if (p.id === f.id) {
      clearTimeout(p.timer);
      S.pending.delete(cid);
      p.el.remove();
      // In a DM we may not have joined: show our own message from the ack.
      addMsg(f.room, { seq: f.seq, from: S.user, ts: f.ts, body: p.body }, true);
      renderRooms();
      return;
    }
  }
}

function onError(f) {
  for (const [cid, p] of S.pending) if (p.id === f.id && f.id !== undefined) return failPending(cid, f.message);
}

// ---------- typing and presence ----------
function onTyping(f) {
  const r = room(f.room);
  clearTimeout(r.typing.get(f.user));
  r.typing.set(f.user, setTimeout(() => { r.typing.delete(f.user); renderTyping(); }, 3000));
  renderTyping();
}
function renderTyping() {
  const r = S.active && room(S.active);
  const who = r ? [...r.typing.keys()] : [];
  $('typing').textContent = who.length ? who.join(', ') + (who.length > 1 ? ' are' : ' is') + ' typing…' : '';
}
function onPresence(f) {
  const r = room(f.room);
  if (f.online) r.online.add(f.user); else r.online.delete(f.user);
  if (S.active === f.room) renderMembers();
  refreshUsers();
}

// ---------- rendering ----------
function renderRooms() {
  const ul = $('rooms');
  ul.replaceChildren();
  const names = [...S.rooms.keys()].sort();
  for (const n of names) {
    const r = S.rooms.get(n);
    const li = el('li', S.active === n ? 'active' : '');
    li.tabIndex = 0;
    li.dataset.room = n;
    li.append(el('span', 'name', label(n)));
    if (r.unread > 0 && S.active !== n) {
      const b = el('span', 'badge', String(r.unread));
      b.setAttribute('aria-label', r.unread + ' unread');
      li.append(b);
    }
    li.onclick = () => openRoom(n);
    li.onkeydown = (e) => { if (e.key === 'Enter') openRoom(n); };
    ul.append(li);
  }
}

function renderUsers() {
  const ul = $('users');
  ul.replaceChildren();
  for (const u of S.users) {
    if (u.username === S.user) continue;
    const li = el('li');
    li.tabIndex = 0;
    li.dataset.user = u.username;
    const dot = el('span', 'dot' + (u.online ? ' online' : ''));
    dot.setAttribute('aria-label', u.online ? 'online' : 'offline');
    li.append(dot, el('span', 'name', u.username));
    li.onclick = () => openRoom(dmName(u.username));
    li.onkeydown = (e) => { if (e.key === 'Enter') openRoom(dmName(u.username)); };
    ul.append(li);
  }
}

function renderMembers() {
  const ul = $('members');
  ul.replaceChildren();
  const r = S.active && room(S.active);
  if (!r) return;
  const names = new Set([...r.online, ...r.receipts.keys()]);
  for (const u of [...names].sort()) {
    const li = el('li');
    li.dataset.member = u;
    const dot = el('span', 'dot' + (r.online.has(u) ? ' online' : ''));
    dot.setAttribute('aria-label', r.online.has(u) ? 'online' : 'offline');
    li.append(dot, el('span', 'name', u));
    ul.append(li);
  }
}

function addNotice(name, text) {
  if (S.active !== name) return;
  $('log').append(el('div', 'notice', text));
}

async function openRoom(name) {
  S.active = name;
  const r = room(name);
  r.unread = 0;
  $('room-title').textContent = label(name);
  $('text').disabled = false; $('send').disabled = false;
  $('search-results').hidden = true;
  const log = $('log');
  log.replaceChildren();
  for (const m of [...r.msgs.values()].sort((a, b) => a.seq - b.seq)) log.append(msgEl(name, m));
  for (const p of S.pending.values()) if (p.room === name) log.append(p.el);
  renderStatuses(name);
  log.scrollTop = log.scrollHeight;
  renderRooms(); renderMembers(); renderTyping();
  await joinRoom(name);
  markRead(name);
  $('text').focus();
}

async function search(q) {
  const box = $('search-results');
  box.replaceChildren();
  if (!S.active || !q.trim()) { box.hidden = true; return; }
  box.hidden = false;
  try {
    const v = await api('GET', `/api/rooms/${encodeURIComponent(S.active)}/search?q=${encodeURIComponent(q)}`);
    if (!v.messages.length) box.append(el('p', '', 'No matches.'));
    for (const m of v.messages) box.append(el('p', 'hit', `${m.from}: ${bodyText(m.body)}`));
  } catch (e) { box.append(el('p', 'error', e.message)); }
}

// ---------- wiring ----------
document.addEventListener('DOMContentLoaded', () => {
  $('auth-form').addEventListener('submit', (e) => { e.preventDefault(); auth(false); });
  $('register').addEventListener('click', () => { if ($('auth-form').reportValidity()) auth(true); });
  $('logout').addEventListener('click', logout);
  $('join-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const n = $('join-room').value.trim();
    if (n) { $('join-room').value = ''; openRoom(n); }
  });
  $('send-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const t = $('text').value;
    $('text').value = '';
    sendText(t);
  });
  $('text').addEventListener('input', () => {
    const now = Date.now();
    if (S.active && room(S.active).joined && now - S.lastTypingSent > 2000) {
      S.lastTypingSent = now;
      send({ t: 'typing', room: S.active });
    }
  });
  $('search-form').addEventListener('submit', (e) => { e.preventDefault(); search($('search-q').value); });
  $('log').addEventListener('scroll', () => { if ($('log').scrollTop < 20 && S.active) loadOlder(S.active); });
  document.addEventListener('visibilitychange', () => { if (document.visibilityState === 'visible' && S.active) markRead(S.active); });
  if (S.token && S.user) start();
});
