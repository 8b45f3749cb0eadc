// Shoal admin console: the operators' view of every node (GET
// /api/admin/overview, refreshed every 2 s) and their actions, over the
// REST API an operator's scripts use too. Peer-supplied text goes in with
// textContent only.
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem('shoal.token');

async function api(method, path, body) {
  const r = await fetch(path, {
    method,
    headers: { 'Content-Type': 'application/json', Authorization: 'Bearer ' + token },
    body: body ? JSON.stringify(body) : undefined,
  });
  const v = await r.json().catch(() => ({}));
  if (!r.ok) throw Object.assign(new Error(v.message || 'HTTP ' + r.status), { status: r.status });
  return v;
}

function cell(tr, text) { const td = document.createElement('td'); td.textContent = text; tr.append(td); return td; }
function button(td, label, aria, fn) {
  const b = document.createElement('button');
  b.type = 'button';
  b.textContent = label;
  b.setAttribute('aria-label', aria);
  b.onclick = () => fn().then(refresh, (e) => say(e.message));
  td.append(b);
}
function say(text) { $('status').textContent = text; }
function rows(id) { const tb = $(id).querySelector('tbody'); tb.replaceChildren(); return tb; }

// The last deliveries count seen per node, for a rate between refreshes.
const seen = new Map();
function rate(node, deliveries) {
  const now = Date.now();
  const last = seen.get(node);
  seen.set(node, { deliveries, at: now });
  if (!last || now <= last.at) return '-';
  return ((deliveries - last.deliveries) * 1000 / (now - last.at)).toFixed(1);
}

function render(v) {
  const nodes = rows('nodes');
  const conns = rows('conns');
  const rooms = rows('rooms');
  for (const n of v.nodes) {
    const tr = document.createElement('tr');
    cell(tr, n.node);
    cell(tr, n.connections ? String(n.connections.length) : '-');
    cell(tr, n.rooms ? String(n.rooms.length) : '-');
    cell(tr, n.stats ? String(n.stats.deliveries) : '-');
    cell(tr, n.stats ? rate(n.node, n.stats.deliveries) : '-');
    const ms = (x) => (x == null ? '-' : x < 1 ? x.toFixed(3) : x.toFixed(1));
    cell(tr, n.stats ? `${ms(n.stats.publish_p50_ms)} / ${ms(n.stats.publish_p99_ms)} ms` : '-');
    cell(tr, n.error ? 'unreachable: ' + n.error : 'up');
    nodes.append(tr);
    for (const c of n.connections || []) {
      const r = document.createElement('tr');
      r.dataset.user = c.user;
      r.dataset.node = n.node;
      cell(r, n.node); cell(r, c.user); cell(r, c.addr || ''); cell(r, c.transport); cell(r, c.encoding);
      cell(r, c.age_secs + ' s'); cell(r, String(c.queued)); cell(r, c.rooms.join(', '));
      button(cell(r, ''), 'Disconnect', `Disconnect ${c.user} on ${n.node}`,
        () => api('POST', '/api/admin/disconnect', { node: n.node, id: c.id }).then(() => say(`Disconnected ${c.user}.`)));
      conns.append(r);
    }
    for (const x of n.rooms || []) {
      const r = document.createElement('tr');
      cell(r, n.node); cell(r, x.room); cell(r, String(x.connections)); cell(r, String(x.users));
      cell(r, String(x.last_seq)); cell(r, rate(`${n.node} ${x.room}`, x.last_seq));
      cell(r, x.owner ? x.owner + (x.private ? ' (private)' : '') : 'open');
      rooms.append(r);
    }
  }
  const users = rows('users');
  for (const u of v.users) {
    const r = document.createElement('tr');
    r.dataset.user = u.user;
    cell(r, u.user); cell(r, String(u.sessions)); cell(r, u.nodes.join(', '));
    const td = cell(r, '');
    button(td, 'Disconnect all', `Disconnect every session of ${u.user}`,
      () => api('POST', '/api/admin/disconnect', { user: u.user }).then(() => say(`Disconnected ${u.user}.`)));
    button(td, 'Revoke', `Revoke ${u.user}'s tokens`,
      () => api('POST', '/api/admin/revoke', { user: u.user }).then(() => say(`Revoked ${u.user}'s tokens.`)));
    button(td, 'Ban', `Ban ${u.user} from the server`,
      () => api('POST', '/api/admin/ban', { user: u.user }).then(() => say(`Banned ${u.user}.`)));
    users.append(r);
  }
}

async function refresh() {
  try {
    const find = $('find-user').value.trim();
    render(await api('GET', '/api/admin/overview' + (find ? '?user=' + encodeURIComponent(find) : '')));
    const a = await api('GET', '/api/admin/audit');
    const ol = $('audit');
    ol.replaceChildren();
    for (const e of a.entries) {
      const li = document.createElement('li');
      li.textContent = `${new Date(e.ts).toLocaleString()} ${e.actor} ${e.action} ${e.detail}`;
      ol.append(li);
    }
  } catch (e) {
    if (e.status === 401 || e.status === 403) { show(false); $('signin-error').textContent = e.message; return; }
    say('Refresh failed: ' + e.message);
  }
}

function show(signedIn) {
  $('signin').hidden = signedIn;
  $('console').hidden = !signedIn;
}

let timer = null;
function start() {
  show(true);
  refresh();
  clearInterval(timer);
  timer = setInterval(refresh, 2000);
}

$('signin-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  try {
    const r = await fetch('/api/login', { method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ username: $('a-user').value, password: $('a-pass').value }) });
    const v = await r.json();
    if (!r.ok) throw new Error(v.message || 'HTTP ' + r.status);
    token = v.token;
    sessionStorage.setItem('shoal.token', token);
    $('who').textContent = v.username;
    start();
  } catch (err) { $('signin-error').textContent = err.message; }
});
$('mod-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const room = $('m-room').value.trim();
  api('POST', `/api/admin/rooms/${encodeURIComponent(room)}/moderate`, { action: $('m-action').value, user: $('m-user').value.trim() })
    .then(() => { say('Done.'); refresh(); }, (err) => say(err.message));
});
$('find-form').addEventListener('submit', (e) => { e.preventDefault(); refresh(); });
$('unban-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const user = $('u-user').value.trim();
  api('POST', '/api/admin/unban', { user }).then(() => { say(`Lifted ${user}'s ban.`); refresh(); }, (err) => say(err.message));
});
$('del-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const room = $('d-room').value.trim();
  api('POST', `/api/admin/rooms/${encodeURIComponent(room)}/messages/${Number($('d-seq').value)}/delete`)
    .then(() => { say('Deleted.'); refresh(); }, (err) => say(err.message));
});
if (token) start(); else show(false);
