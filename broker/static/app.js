// Shoal web chat: the page's UI over @shoal/client (clients/js, served at
// /vendor/shoal-client.js), JSON frames. The library owns the connection:
// reconnect with backoff, re-join with `since`, publishes retried with
// their `cid`, and the Socket.IO long-polling fallback when a WebSocket
// cannot open. This file keeps only what the page shows.
// Every piece of peer-supplied text goes into the page with textContent,
// never innerHTML, so messages can't inject markup or scripts.
import { connect, ShoalError } from '/vendor/shoal-client.js';

const $ = (id) => document.getElementById(id);
const S = {
  token: sessionStorage.getItem('shoal.token'),
  user: sessionStorage.getItem('shoal.user'),
  client: null,         // @shoal/client connection while signed in
  rooms: new Map(),     // name -> room state (the page's view of it)
  active: null,
  pending: new Map(),   // local id -> {room, body, el} publishes not acked yet
  nextLocal: 1,
  users: [],
  lastTypingSent: 0,
  compose: null,        // {mode: 'edit' | 'reply', room, seq} while the composer edits or replies
  thread: null,         // {room, seq} of the open thread panel
  mentionPick: 0,       // selected entry of the mention list
};

const REACTIONS = ['👍', '❤️', '😂', '🎉', '😮', '😢'];

function room(name) {
  let r = S.rooms.get(name);
  if (!r) {
    r = { name, msgs: new Map(), lastSeq: 0, oldest: null, more: true, unread: 0, mentions: 0,
          handle: null, online: new Set(), receipts: new Map(), typing: new Map() };
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
function mentionsMe(m) { return (m.mentions || []).includes(S.user); }

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
  const token = S.token;
  stop();
  // Revoke after closing, so the 4002 that follows is not "session ended".
  await fetch('/api/logout', { method: 'POST', headers: { Authorization: 'Bearer ' + token } }).catch(() => {});
}

function stop() {
  sessionStorage.removeItem('shoal.token');
  sessionStorage.removeItem('shoal.user');
  S.token = S.user = null;
  if (S.client) { S.client.close(); S.client = null; }
  S.rooms.clear(); S.pending.clear(); S.active = null;
  $('app').hidden = true; $('auth').hidden = false; $('logout').hidden = true;
  $('me').textContent = ''; $('log').replaceChildren(); $('rooms').replaceChildren();
  setConn('offline', 'offline');
}

function start() {
  $('auth').hidden = true; $('app').hidden = false; $('logout').hidden = false;
  $('me').textContent = S.user;
  openConnection();
  refreshRooms();
  refreshUsers();
}

async function refreshRooms() {
  try {
    const v = await api('GET', '/api/rooms');
    for (const r of v.rooms) {
      const st = room(r.room);
      // Unread as the server counts it, unless we are looking at the room.
      if (S.active !== r.room) { st.unread = r.unread; st.mentions = r.mentions || 0; }
      st.serverLast = r.last_seq;
    }
    renderRooms();
  } catch (_) { /* offline: keep what we have */ }
}

async function refreshUsers() {
  try { S.users = (await api('GET', '/api/users')).users; renderUsers(); } catch (_) { /* retry later */ }
}

// ---------- connection ----------
function setConn(cls, text) { const c = $('conn'); c.className = 'conn ' + cls; c.textContent = text; }

// socket.io-client for the long-polling fallback, loaded only when needed.
function loadIo() {
  if (window.io) return window.io;
  return new Promise((resolve, reject) => {
    const sc = document.createElement('script');
    sc.src = '/vendor/socket.io.min.js';
    sc.onload = () => resolve(window.io);
    sc.onerror = () => reject(new Error('socket.io-client did not load'));
    document.head.appendChild(sc);
  });
}

function openConnection() {
  const c = connect({ url: location.origin, token: S.token, encoding: 'json', transports: ['websocket', 'polling'], io: loadIo });
  S.client = c;
  const via = () => (c.transport === 'polling' ? ' (long-polling)' : '');
  setConn('reconnecting', 'connecting…');
  c.on('connecting', () => { if (S.client === c) setConn('reconnecting', `connecting${via()}…`); });
  c.on('connected', () => {
    if (S.client !== c) return;
    setConn('connected', 'connected' + via());
    for (const p of S.pending.values()) if (!p.failed) pendingStatus(p, 'sending…');
    refreshRooms(); refreshUsers();
  });
  c.on('disconnected', (d) => {
    if (S.client !== c) return;
    for (const r of S.rooms.values()) r.online.clear();
    if (S.active) renderMembers();
    if (d.code === 4007) {
      // An operator disconnected us: stay signed in, do not reconnect.
      setConn('offline', 'disconnected by an operator (reload to reconnect)');
      return;
    }
    if (!d.willRetry) { stop(); $('auth-error').textContent = 'Session ended; please log in again.'; return; }
    setConn('reconnecting', 'reconnecting…');
    // The library sends these again (same cid) once reconnected.
    for (const p of S.pending.values()) if (!p.failed) pendingStatus(p, 'waiting for the connection…');
  });
  // DMs reach us whether or not the room is joined.
  c.on('dm', onMsg);
}

// Join through the library once per room; it re-joins with `since` after
// every reconnect, so the handlers below see each message once, in order.
function joinRoom(name) {
  const r = room(name);
  if (r.handle) return r.handle.ready.catch(() => {});
  const h = S.client.join(name);
  r.handle = h;
  h.on('message', onMsg);
  h.on('typing', onTyping);
  h.on('presence', onPresence);
  h.on('mark', onMark);
  h.on('deleted', onDeleted);
  h.on('edit', onEdit);
  h.on('reaction', onReaction);
  h.on('gap', (g) => addNotice(name, `Messages ${g.from}–${g.to} are no longer available.`));
  h.on('joined', () => { loadMembers(name); loadInfo(name); });
  h.on('moderation', (e) => { addNotice(name, moderationText(e), 'moderation'); loadInfo(name); });
  h.on('removed', (e) => {
    r.handle = null;
    r.online.clear();
    addNotice(name, e.reason === 'ban' ? 'You were banned from this room.' : 'You were removed from this room.');
    if (S.active === name) renderMembers();
  });
  h.on('error', (e) => { r.handle = null; addNotice(name, 'Could not join: ' + e.message); });
  return h.ready.then(() => { if (r.msgs.size < 30) return loadOlder(name); }).catch(() => {});
}

// The room's rules as you see them: owner, admins, private members, your role.
async function loadInfo(name) {
  try {
    room(name).info = await api('GET', `/api/rooms/${encodeURIComponent(name)}/info`);
    if (S.active === name) { renderMembers(); renderTopic(); }
  } catch (_) { /* not readable (any more): keep what we had */ }
}

function moderationText(e) {
  const who = e.user || '';
  switch (e.kind) {
    case 'create': return `${e.by} created this room${e.private ? ' (private)' : ''}`;
    case 'invite': return `${e.by} invited ${who}`;
    case 'kick': return `${e.by} removed ${who}`;
    case 'ban': return `${e.by} banned ${who}${e.until ? ' until ' + new Date(e.until).toLocaleString() : ''}`;
    case 'unban': return `${e.by} lifted ${who}'s ban`;
    case 'mute': return `${e.by} muted ${who}`;
    case 'unmute': return `${e.by} unmuted ${who}`;
    case 'role': return `${e.by} made ${who} ${e.role === 'admin' ? 'an admin' : 'a member'}`;
    case 'owner': return `${e.by} gave the room to ${who}`;
    case 'topic': return `${e.by} set the topic: ${e.topic || ''}`;
    default: return `${e.by}: ${e.kind}`;
  }
}

function renderTopic() {
  const r = S.active && room(S.active);
  const i = r && r.info;
  $('room-topic').textContent = i ? `${i.private ? '🔒 ' : ''}${i.topic || ''}` : '';
  if (r) $('room-title').textContent = i && i.title ? i.title : label(r.name);
}

function moderate(name, action, what) {
  const h = room(name).handle;
  (h ? h.moderate(action, what) : Promise.reject(new Error('not joined'))).catch((e) => addNotice(name, e.message));
}

async function loadMembers(name) {
  const r = room(name);
  try {
    const m = await r.handle.members();
    r.online = new Set(m.users);
    for (const rc of m.receipts) r.receipts.set(rc.user, rc);
    if (S.active === name) { renderMembers(); renderStatuses(name); }
  } catch (_) { /* disconnected meanwhile: the next join asks again */ }
}

async function loadOlder(name) {
  const r = room(name);
  if (!r.handle || !r.more || r.loadingOlder) return;
  r.loadingOlder = true;
  try {
    const before = r.oldest === null ? undefined : r.oldest;
    const h = await r.handle.history({ before, limit: 30 });
    r.more = h.more;
    const log = $('log');
    const height = log.scrollHeight;
    for (const m of h.messages) addMsg(name, { ...m, room: name }, false);
    if (S.active === name) {
      if (before === undefined) log.scrollTop = log.scrollHeight;
      else log.scrollTop += log.scrollHeight - height;
    }
  } catch (_) { /* offline; scrolling up again retries */ }
  r.loadingOlder = false;
}

// ---------- messages ----------
// The text with the mentions the broker recognised set apart (as text
// nodes and spans, never markup).
function textEl(m) {
  const d = el('div', 'text');
  const text = bodyText(m.body);
  const names = new Set(m.mentions || []);
  if (!names.size) { d.textContent = text; return d; }
  let last = 0;
  for (const x of text.matchAll(/@([A-Za-z0-9_.-]+)/g)) {
    const name = x[1].replace(/[.-]+$/, '');
    if (!names.has(name)) continue;
    d.append(text.slice(last, x.index));
    d.append(el('span', 'mention' + (name === S.user ? ' me' : ''), '@' + name));
    last = x.index + 1 + name.length;
  }
  d.append(text.slice(last));
  return d;
}

function fileEl(f) {
  const box = el('div', 'file');
  const url = `${f.url}?token=${encodeURIComponent(S.token)}`;
  if (/^image\//.test(f.content_type)) {
    const img = el('img');
    img.src = url;
    img.alt = f.name;
    box.append(img);
  } else {
    const a = el('a', '', `📄 ${f.name} (${Math.ceil((f.size || 0) / 1024)} KB)`);
    a.href = url;
    a.download = f.name;
    box.append(a);
  }
  return box;
}

function msgEl(name, m, inThread = false) {
  const own = m.from === S.user;
  const d = el('div', 'msg' + (own ? ' own' : '') + (mentionsMe(m) && !own ? ' mentions-me' : ''));
  d.dataset.seq = m.seq;
  if (!own) d.append(el('div', 'from', m.from));
  if (m.reply_to && !inThread) {
    const q = el('div', 'quote');
    q.append(el('b', '', m.reply_to.from + ': '), m.reply_to.preview);
    d.append(q);
  }
  d.append(textEl(m));
  if (m.body && typeof m.body === 'object' && m.body.file && typeof m.body.file.url === 'string') d.append(fileEl(m.body.file));
  if (m.reactions && m.reactions.length) {
    const rs = el('div', 'reactions');
    for (const x of m.reactions) {
      const b = el('button', x.me ? 'me' : '', `${x.emoji} ${x.count}`);
      b.type = 'button';
      b.dataset.emoji = x.emoji;
      b.setAttribute('aria-label', `${x.emoji}: ${x.count}${x.me ? ', including you' : ''}`);
      b.onclick = () => react(name, m.seq, x.emoji, !x.me);
      rs.append(b);
    }
    d.append(rs);
  }
  const meta = el('div', 'meta');
  if (m.thread && m.thread.count && !inThread) {
    const t = el('button', 'replies', `${m.thread.count} ${m.thread.count === 1 ? 'reply' : 'replies'}`);
    t.type = 'button';
    t.onclick = () => openThread(name, m.seq);
    meta.append(t);
  }
  meta.append(el('time', '', new Date(m.ts).toLocaleTimeString()));
  if (m.edited_ts) {
    const e = el('span', 'edited', 'edited');
    e.title = 'edited ' + new Date(m.edited_ts).toLocaleString();
    meta.append(e);
  }
  if (own) meta.append(el('span', 'status', '✓'));
  const act = (label, aria, fn, cls = 'act') => {
    const b = el('button', cls, label);
    b.type = 'button';
    b.setAttribute('aria-label', aria);
    b.onclick = fn;
    meta.append(b);
  };
  if (!inThread) act('Reply', 'Reply to this message', () => startCompose('reply', name, m), 'reply');
  act('React', 'React to this message', () => togglePicker(d, name, m.seq), 'react');
  if (own) {
    act('Edit', 'Edit this message', () => startCompose('edit', name, m), 'edit');
    act('Delete', 'Delete this message', () => {
      const h = room(name).handle;
      (h ? h.delete(m.seq) : Promise.reject(new Error('not joined'))).catch((e) => addNotice(name, e.message));
    }, 'del');
  }
  d.append(meta);
  return d;
}

function togglePicker(d, name, seq) {
  const open = d.querySelector('.picker');
  if (open) { open.remove(); return; }
  const p = el('div', 'picker');
  p.setAttribute('role', 'group');
  p.setAttribute('aria-label', 'Pick a reaction');
  const mine = new Set((room(name).msgs.get(seq)?.reactions || []).filter((x) => x.me).map((x) => x.emoji));
  for (const e of REACTIONS) {
    const b = el('button', '', e);
    b.type = 'button';
    b.onclick = () => { p.remove(); react(name, seq, e, !mine.has(e)); };
    p.append(b);
  }
  d.append(p);
}

function react(name, seq, emoji, on) {
  const h = room(name).handle;
  if (!h) return;
  (on ? h.react(seq, emoji) : h.unreact(seq, emoji)).catch((e) => addNotice(name, e.message));
}

// Show message `seq` again wherever it is on screen (the log, the thread).
function rerender(name, seq) {
  const m = room(name).msgs.get(seq);
  if (S.active === name) {
    const old = $('log').querySelector(`.msg[data-seq="${seq}"]`);
    if (old && m) { const n = msgEl(name, m); old.replaceWith(n); updateStatus(name, n, seq); }
  }
  if (S.thread && S.thread.room === name) {
    const old = $('thread-log').querySelector(`.msg[data-seq="${seq}"]`);
    if (old && m) old.replaceWith(msgEl(name, m, true));
    if (S.thread.seq === seq && m) renderThreadRoot();
  }
}

// Events on messages, applied by the rules of PROTOCOL.md §5a.
function onEdit(e) {
  const m = room(e.room).msgs.get(e.seq);
  if (!m || m.from !== e.from) return;
  m.body = e.body;
  m.edited_ts = e.ts;
  m.mentions = e.mentions;
  rerender(e.room, e.seq);
}

function onReaction(x) {
  const m = room(x.room).msgs.get(x.seq);
  if (!m) return;
  const list = m.reactions || (m.reactions = []);
  let r = list.find((y) => y.emoji === x.emoji);
  if (x.on) {
    if (!r) list.push(r = { emoji: x.emoji, count: 0, me: false });
    if (x.user === S.user) { if (r.me) return; r.me = true; }
    r.count++;
  } else if (r) {
    if (x.user === S.user) { if (!r.me) return; r.me = false; }
    r.count--;
    if (r.count <= 0) list.splice(list.indexOf(r), 1);
  }
  list.sort((a, b) => b.count - a.count || (a.emoji < b.emoji ? -1 : 1));
  rerender(x.room, x.seq);
}

// ---------- composing: replies and edits ----------
function startCompose(mode, name, m) {
  S.compose = { mode, room: name, seq: m.seq };
  $('compose-what').textContent = mode === 'edit'
    ? 'Editing your message (Esc cancels)'
    : `Replying to ${m.from}: ${bodyText(m.body).slice(0, 80)}`;
  $('compose-bar').hidden = false;
  if (mode === 'edit') $('text').value = bodyText(m.body);
  $('text').focus();
}
function endCompose() { S.compose = null; $('compose-bar').hidden = true; }

// ---------- threads ----------
function renderThreadRoot() {
  const box = $('thread-root');
  box.replaceChildren();
  const m = S.thread && room(S.thread.room).msgs.get(S.thread.seq);
  if (m) box.append(el('b', '', m.from + ': '), bodyText(m.body));
}

async function openThread(name, seq) {
  S.thread = { room: name, seq };
  $('thread').hidden = false;
  $('app').classList.add('with-thread');
  renderThreadRoot();
  const log = $('thread-log');
  log.replaceChildren();
  try {
    const t = await room(name).handle.thread(seq, { limit: 100 });
    for (const m of t.messages.reverse()) {
      room(name).msgs.set(m.seq, { ...room(name).msgs.get(m.seq), ...m, room: name });
      log.append(msgEl(name, { ...m, room: name }, true));
    }
  } catch (e) { log.append(el('p', 'error', e.message)); }
}
function closeThread() { S.thread = null; $('thread').hidden = true; $('app').classList.remove('with-thread'); }

// ---------- files ----------
function uploadFile(file) {
  const name = S.active;
  if (!name || !file) return;
  const r = room(name);
  $('upload').hidden = false;
  $('upload-name').textContent = `Uploading ${file.name}…`;
  $('upload-progress').value = 0;
  const xhr = new XMLHttpRequest();
  xhr.open('POST', `/api/files?room=${encodeURIComponent(name)}&name=${encodeURIComponent(file.name)}`);
  xhr.setRequestHeader('Authorization', 'Bearer ' + S.token);
  xhr.setRequestHeader('Content-Type', file.type || 'application/octet-stream');
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) $('upload-progress').value = Math.round(100 * e.loaded / e.total); };
  xhr.onload = () => {
    $('upload').hidden = true;
    let v = {};
    try { v = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
    if (xhr.status !== 201) { addNotice(name, `Could not attach ${file.name}: ${v.message || 'HTTP ' + xhr.status}`); return; }
    const f = { id: v.id, url: v.url, name: v.name, content_type: v.content_type, size: v.size };
    sendBody(name, { text: v.name, file: f }, r);
  };
  xhr.onerror = () => { $('upload').hidden = true; addNotice(name, `Could not attach ${file.name}: connection lost`); };
  xhr.send(file);
}

// ---------- mentions ----------
function mentionCandidates() {
  const r = S.active && room(S.active);
  if (!r) return [];
  const peer = dmPeer(r.name);
  const names = peer ? [peer] : [...new Set([...r.online, ...r.receipts.keys(), ...S.users.map((u) => u.username)])];
  return names.filter((n) => n !== S.user).sort();
}

function mentionQuery() {
  const t = $('text');
  const upto = t.value.slice(0, t.selectionStart);
  const x = upto.match(/(^|\s)@([A-Za-z0-9_.-]*)$/);
  return x ? x[2] : null;
}

function renderMentionPop() {
  const pop = $('mention-pop');
  const q = mentionQuery();
  const list = q === null ? [] : mentionCandidates().filter((n) => n.toLowerCase().startsWith(q.toLowerCase())).slice(0, 8);
  pop.replaceChildren();
  pop.hidden = list.length === 0;
  S.mentionPick = Math.min(S.mentionPick, Math.max(0, list.length - 1));
  list.forEach((n, i) => {
    const li = el('li', '', '@' + n);
    li.setAttribute('role', 'option');
    li.dataset.name = n;
    li.setAttribute('aria-selected', String(i === S.mentionPick));
    li.onmousedown = (e) => { e.preventDefault(); pickMention(n); };
    pop.append(li);
  });
}

function pickMention(n) {
  const t = $('text');
  const upto = t.value.slice(0, t.selectionStart);
  const rest = t.value.slice(t.selectionStart);
  const start = upto.lastIndexOf('@');
  t.value = upto.slice(0, start) + '@' + n + ' ' + rest;
  const at = start + n.length + 2;
  t.setSelectionRange(at, at);
  $('mention-pop').hidden = true;
  t.focus();
}

// ---------- notifications ----------
function askNotifications() {
  if (!('Notification' in window) || Notification.permission !== 'default' || localStorage.getItem('shoal.asked')) return;
  localStorage.setItem('shoal.asked', '1');
  Notification.requestPermission().catch(() => {});
}

// A DM or a mention, while the page is hidden.
function notify(f) {
  if (!('Notification' in window) || Notification.permission !== 'granted') return;
  if (document.visibilityState !== 'hidden') return;
  if (!dmPeer(f.room) && !mentionsMe(f)) return;
  const n = new Notification(dmPeer(f.room) ? `${f.from} (direct message)` : `${f.from} mentioned you in ${f.room}`, {
    body: bodyText(f.body).slice(0, 140),
    tag: `${f.room}:${f.seq}`,
  });
  n.onclick = () => { window.focus(); openRoom(f.room); };
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
  if (isNew && f.reply_to) {
    // The quoted message's thread grows; an open thread shows the reply.
    const q = r.msgs.get(f.reply_to.seq);
    if (q) {
      q.thread = { count: (q.thread?.count || 0) + 1, last_seq: f.seq, last_ts: f.ts };
      rerender(f.room, q.seq);
    }
    if (S.thread && S.thread.room === f.room && S.thread.seq === f.reply_to.seq) {
      $('thread-log').append(msgEl(f.room, f, true));
    }
  }
  if (!isNew && (f.reply_to || f.mentions)) {
    // Our own message, shown from its ack first: the live copy brings its
    // quote and mentions.
    Object.assign(r.msgs.get(f.seq), { reply_to: f.reply_to, mentions: f.mentions });
    rerender(f.room, f.seq);
  }
  if (!isNew || f.from === S.user) { renderRooms(); return; }
  notify(f);
  if (mentionsMe(f) && S.active !== f.room) r.mentions++;
  if (S.active === f.room && document.visibilityState === 'visible') markRead(f.room);
  else {
    r.unread++;
    // Tell the sender it reached a device (✓✓), even if not read yet.
    if (r.handle?.joined) r.handle.mark(f.seq, 'delivered');
  }
  r.typing.delete(f.from); renderTyping();
  renderRooms();
}

let readTimer = null;
function markRead(name) {
  clearTimeout(readTimer);
  readTimer = setTimeout(() => {
    const r = room(name);
    if (!r.handle?.joined || r.lastSeq === 0 || r.readSent >= r.lastSeq) return;
    r.readSent = r.lastSeq;
    r.handle.mark(r.lastSeq, 'read');
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

// ---------- sending (optimistic; the library retries with the same cid) ----------
function sendText(text) {
  const name = S.active;
  if (!name || !text.trim()) return;
  const c = S.compose && S.compose.room === name ? S.compose : null;
  endCompose();
  if (c && c.mode === 'edit') {
    const h = room(name).handle;
    const old = room(name).msgs.get(c.seq);
    // Keep what the body had besides its text (an attachment).
    const body = old && old.body && typeof old.body === 'object' ? { ...old.body, text } : { text };
    (h ? h.edit(c.seq, body) : Promise.reject(new Error('not joined'))).catch((e) => addNotice(name, 'Not edited: ' + e.message));
    return;
  }
  sendBody(name, { text }, room(name), c ? c.seq : undefined);
}

function sendBody(name, body, r, replyTo) {
  const d = el('div', 'msg own pending');
  d.append(el('div', 'text', bodyText(body)));
  const meta = el('div', 'meta');
  meta.append(el('span', 'status', 'sending…'));
  d.append(meta);
  $('log').append(d);
  $('log').scrollTop = $('log').scrollHeight;
  const key = S.nextLocal++;
  S.pending.set(key, { room: name, body, el: d, replyTo });
  sendPending(key);
}

function pendingStatus(p, text) { p.el.querySelector('.status').textContent = text; }

function sendPending(key) {
  const p = S.pending.get(key);
  if (!p) return;
  p.failed = false;
  p.el.className = 'msg own pending';
  pendingStatus(p, S.client?.state === 'connected' ? 'sending…' : 'waiting for the connection…');
  p.el.querySelector('.retry')?.remove();
  const peer = dmPeer(p.room);
  const h = room(p.room).handle;
  const opts = p.replyTo !== undefined ? { replyTo: p.replyTo } : {};
  const sent = peer ? S.client.dm(peer, p.body, opts)
    : h ? h.publish(p.body, opts) : Promise.reject(new Error('not joined'));
  sent.then((ack) => {
    if (!S.pending.delete(key)) return;
    p.el.remove();
    // In a DM we may not have joined: show our own message from the ack
    // (the live copy, with its quote and mentions, replaces nothing: same seq).
    addMsg(ack.room, { seq: ack.seq, from: S.user, ts: ack.ts, body: p.body }, true);
    renderRooms();
  }, (e) => failPending(key, e instanceof ShoalError ? e.message : 'not sent'));
}

function failPending(key, why) {
  const p = S.pending.get(key);
  if (!p) return;
  p.failed = true;
  p.el.className = 'msg own failed';
  pendingStatus(p, 'not sent (' + why + ')');
  if (!p.el.querySelector('.retry')) {
    const b = el('button', 'retry', 'Retry');
    b.type = 'button';
    b.onclick = () => sendPending(key);
    p.el.querySelector('.meta').append(b);
  }
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
    if (r.mentions > 0 && S.active !== n) {
      const b = el('span', 'badge mention', '@' + r.mentions);
      b.setAttribute('aria-label', r.mentions + (r.mentions === 1 ? ' mention' : ' mentions'));
      li.append(b);
    }
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
  $('invite-form').hidden = true;
  if (!r) return;
  const i = r.info || {};
  const roleOf = (u) => (u === i.owner ? 'owner' : (i.admins || []).includes(u) ? 'admin' : null);
  const mine = i.you === 'owner' ? 3 : i.you === 'admin' ? 2 : 1;
  $('invite-form').hidden = !(i.created && mine >= 2);
  const names = new Set([...r.online, ...r.receipts.keys(), ...(i.members || []), ...(i.admins || []), ...(i.owner ? [i.owner] : [])]);
  for (const u of [...names].sort()) {
    const li = el('li');
    li.dataset.member = u;
    const dot = el('span', 'dot' + (r.online.has(u) ? ' online' : ''));
    dot.setAttribute('aria-label', r.online.has(u) ? 'online' : 'offline');
    li.append(dot, el('span', 'name', u));
    const role = roleOf(u);
    if (role) li.append(el('span', 'role ' + role, role));
    const theirs = role === 'owner' ? 3 : role === 'admin' ? 2 : 1;
    // Moderators act on members below them (PROTOCOL.md §5b).
    if (i.created && u !== S.user && mine >= 2 && theirs < mine) {
      const box = el('span', 'mod');
      const b = (label, action, what = {}) => {
        const x = el('button', action, label);
        x.type = 'button';
        x.setAttribute('aria-label', `${label} ${u}`);
        x.onclick = () => moderate(r.name, action, { user: u, ...what });
        box.append(x);
      };
      b('Kick', 'kick');
      b('Ban', 'ban');
      b('Mute', 'mute');
      if (mine === 3) b(role === 'admin' ? 'Demote' : 'Make admin', 'role', { role: role === 'admin' ? 'member' : 'admin' });
      li.append(box);
    }
    ul.append(li);
  }
}

function addNotice(name, text, cls = '') {
  if (S.active !== name) return;
  $('log').append(el('div', 'notice ' + cls, text));
}

async function openRoom(name) {
  S.active = name;
  const r = room(name);
  r.unread = 0;
  r.mentions = 0;
  endCompose();
  if (S.thread && S.thread.room !== name) closeThread();
  $('room-title').textContent = label(name);
  renderTopic();
  $('text').disabled = false; $('send').disabled = false; $('file').disabled = false;
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

// An error under a side form (role=alert, replaced by the next one).
function alertIn(formId, text) {
  const f = $(formId);
  f.querySelector('.error')?.remove();
  const p = el('p', 'error', text);
  p.setAttribute('role', 'alert');
  f.append(p);
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
// A module runs after the document is parsed.
{
  $('auth-form').addEventListener('submit', (e) => { e.preventDefault(); auth(false); });
  $('register').addEventListener('click', () => { if ($('auth-form').reportValidity()) auth(true); });
  $('logout').addEventListener('click', logout);
  $('create-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const n = $('create-room').value.trim();
    if (!n || !S.client) return;
    try {
      await S.client.create(n, { private: $('create-private').checked });
      $('create-room').value = '';
      $('create-private').checked = false;
      openRoom(n);
    } catch (err) {
      alertIn('create-form', err.message);
    }
  });
  $('invite-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const u = $('invite-user').value.trim();
    if (!u || !S.active) return;
    $('invite-user').value = '';
    moderate(S.active, 'invite', { user: u });
  });
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
    renderMentionPop();
    const now = Date.now();
    const h = S.active && room(S.active).handle;
    if (h?.joined && now - S.lastTypingSent > 2000) {
      S.lastTypingSent = now;
      h.typing();
    }
  });
  $('text').addEventListener('keydown', (e) => {
    const pop = $('mention-pop');
    if (!pop.hidden) {
      const items = [...pop.children];
      if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
        e.preventDefault();
        S.mentionPick = (S.mentionPick + (e.key === 'ArrowDown' ? 1 : items.length - 1)) % items.length;
        renderMentionPop();
        return;
      }
      if (e.key === 'Tab' || e.key === 'Enter') {
        e.preventDefault();
        pickMention(items[S.mentionPick].dataset.name);
        return;
      }
      if (e.key === 'Escape') { pop.hidden = true; return; }
    }
    if (e.key === 'Escape' && S.compose) { if (S.compose.mode === 'edit') $('text').value = ''; endCompose(); }
  });
  $('text').addEventListener('blur', () => setTimeout(() => { $('mention-pop').hidden = true; }, 150));
  $('compose-cancel').addEventListener('click', () => { if (S.compose?.mode === 'edit') $('text').value = ''; endCompose(); });
  $('thread-close').addEventListener('click', closeThread);
  $('file').addEventListener('change', () => { const f = $('file').files[0]; $('file').value = ''; uploadFile(f); });
  const chat = document.querySelector('.chat');
  chat.addEventListener('dragover', (e) => { if (S.active) { e.preventDefault(); chat.classList.add('dragging'); } });
  chat.addEventListener('dragleave', () => chat.classList.remove('dragging'));
  chat.addEventListener('drop', (e) => {
    e.preventDefault();
    chat.classList.remove('dragging');
    const f = e.dataTransfer?.files?.[0];
    if (f) uploadFile(f);
  });
  // Asked once, on a first click (browsers want a gesture for it).
  document.addEventListener('click', askNotifications, { once: true });
  $('search-form').addEventListener('submit', (e) => { e.preventDefault(); search($('search-q').value); });
  $('log').addEventListener('scroll', () => { if ($('log').scrollTop < 20 && S.active) loadOlder(S.active); });
  document.addEventListener('visibilitychange', () => { if (document.visibilityState === 'visible' && S.active) markRead(S.active); });
  if (S.token && S.user) start();
}
