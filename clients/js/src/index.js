// Shoal client for the native protocol (proto/PROTOCOL.md, shoal.v1).
//
// Rules:
// - One WebSocket per client; frames in MessagePack (default) or JSON.
// - Reconnect with full-jitter backoff (0.5 s doubling to 15 s), honouring
//   the close codes: 4002 (revoked) and 4007 (an operator disconnected
//   this client) never retry; 4001 (expired) retries
//   only with a fresh token from `getToken`; 4005 (try again later) backs
//   off; 1001 and 4006 (node going away, cut off) reconnect at once to
//   whatever node the URL reaches.
// - Every joined room is re-joined with `since` = the last seq delivered
//   to the app: messages reach the app exactly once, in seq order, across
//   reconnects (a seq at or below the last one is dropped).
// - A room's log holds messages and events on them (edits, reactions,
//   deletions; PROTOCOL.md §5a), one seq each: the library tracks both, so
//   the events missed while away arrive too, in order, once. Messages come
//   as 'message', events as 'edit', 'reaction' and 'deleted'.
// - A publish carries a `cid`; one not acked when the connection drops is
//   sent again with the same `cid` after the reconnect (the broker acks
//   the original seq and does not deliver twice).
// - Bounded: at most `maxPending` publishes wait for their ack (past it,
//   `publish` rejects), requests time out after `requestTimeout`.
// - Transports: the WebSocket at /ws first. With `transports` listing
//   'polling' and an `io` loader (socket.io-client's `io`), a WebSocket
//   that closes before it opens while the server answers HTTP (a proxy
//   that refuses upgrades) switches the client to Socket.IO long-polling
//   at /socket.io/ (PROTOCOL.md §8), which carries the same frames as
//   events; the app sees no difference. Long-polling speaks JSON.
// MessagePack is loaded only when used, so a page on JSON frames needs no
// bundler or import map for it.
let msgpack = null;
async function loadMsgpack() {
  msgpack ??= await import('@msgpack/msgpack');
  return msgpack;
}

const SUBPROTOCOL = { msgpack: 'shoal.v1.msgpack', json: 'shoal.v1.json' };

// The native reply frame a Socket.IO request's ack callback stands for.
const REPLY = { join: 'joined', leave: 'left', pub: 'ack', members: 'members', history: 'history', delete: 'deleted', ping: 'pong' };

/** A small event emitter (no dependency on Node's or the DOM's). */
class Emitter {
  constructor() { this._handlers = new Map(); }
  on(name, fn) {
    if (!this._handlers.has(name)) this._handlers.set(name, new Set());
    this._handlers.get(name).add(fn);
    return () => this.off(name, fn);
  }
  off(name, fn) { this._handlers.get(name)?.delete(fn); }
  emit(name, arg) {
    for (const fn of this._handlers.get(name) || []) {
      try { fn(arg); } catch (e) { queueMicrotask(() => { throw e; }); }
    }
  }
}

/** An error the broker answered with (`error` frame). */
export class ShoalError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'ShoalError';
    this.code = code;
  }
}

/** A joined room. */
class Room extends Emitter {
  constructor(client, name) {
    super();
    this.client = client;
    this.name = name;
    /** Last seq delivered to the app (0: none yet). */
    this.lastSeq = 0;
    this.joined = false;
  }

  /**
   * Publish `body` (optionally as a reply: `{replyTo: seq}`); resolves
   * `{seq, ts}` once the broker acked it.
   */
  publish(body, { replyTo } = {}) {
    const target = { room: this.name };
    if (replyTo !== undefined) target.reply_to = replyTo;
    return this.client._publish(target, body);
  }

  /** Replace the body of your message `seq`; resolves `{seq, ts}` of the edit. */
  async edit(seq, body) {
    const r = await this.client._request({ t: 'edit', room: this.name, seq, body });
    return { seq: r.seq, ts: r.ts };
  }

  /** Add a reaction to message `seq`; resolves `{seq, ts}` of the event. */
  async react(seq, emoji) {
    const r = await this.client._request({ t: 'react', room: this.name, seq, emoji, on: true });
    return { seq: r.seq, ts: r.ts };
  }

  /** Remove your reaction from message `seq`. */
  async unreact(seq, emoji) {
    const r = await this.client._request({ t: 'react', room: this.name, seq, emoji, on: false });
    return { seq: r.seq, ts: r.ts };
  }

  /**
   * A moderation action in a created room: `invite`, `kick`, `ban`,
   * `unban`, `mute`, `unmute`, `role`, `owner`, `topic`, with `{user,
   * until, role, topic, reason}` as it takes; resolves `{seq, ts}`.
   */
  async moderate(action, what = {}) {
    const r = await this.client._request({ t: 'moderate', room: this.name, action, ...what });
    return { seq: r.seq, ts: r.ts };
  }

  /** A page of the replies to message `seq`, newest first: `{messages, more}`. */
  async thread(seq, { before, limit } = {}) {
    const f = { t: 'thread', room: this.name, seq };
    if (before !== undefined) f.before = before;
    if (limit !== undefined) f.limit = limit;
    const r = await this.client._request(f);
    return { messages: r.messages, more: r.more };
  }

  /** Say you are typing (best effort). */
  typing() { this.client._send({ t: 'typing', room: this.name }); }

  /** Move your `delivered` or `read` watermark to `seq`. */
  mark(seq, state = 'read') { this.client._send({ t: 'mark', room: this.name, seq, state }); }

  /** A page of stored history, newest first: `{messages, more}`. */
  async history({ before, limit } = {}) {
    const f = { t: 'history', room: this.name };
    if (before !== undefined) f.before = before;
    if (limit !== undefined) f.limit = limit;
    const r = await this.client._request(f);
    return { messages: r.messages, more: r.more };
  }

  /** Who is online here, and everyone's receipts: `{users, receipts}`. */
  async members() {
    const r = await this.client._request({ t: 'members', room: this.name });
    return { users: r.users, receipts: r.receipts || [] };
  }

  /** Delete one of your own messages. */
  async delete(seq) { await this.client._request({ t: 'delete', room: this.name, seq }); }

  /** Leave the room. */
  async leave() {
    this.client.rooms.delete(this.name);
    if (this.joined) await this.client._request({ t: 'leave', room: this.name });
  }

  _deliver(f) {
    if (f.seq <= this.lastSeq) return; // replayed twice at a seam: drop
    this.lastSeq = f.seq;
    const at = f.seq;
    switch (f.kind) {
      case undefined: case null: this.emit('message', f); break;
      case 'edit':
        this.emit('edit', { room: f.room, seq: f.target, from: f.from, ts: f.ts, body: f.body, mentions: f.mentions || [], at });
        break;
      case 'react': case 'unreact':
        this.emit('reaction', { room: f.room, seq: f.target, user: f.from, emoji: f.body, on: f.kind === 'react', at });
        break;
      case 'delete': this.emit('deleted', { room: f.room, seq: f.target, by: f.from, at }); break;
      case 'create': case 'invite': case 'kick': case 'ban': case 'unban': case 'mute':
      case 'unmute': case 'role': case 'owner': case 'topic':
        this.emit('moderation', { room: f.room, kind: f.kind, by: f.from, ts: f.ts, at, ...(f.body || {}) });
        break;
      default: this.emit('entry', f); // a kind newer than this library
    }
  }
}

/** A connection to a Shoal broker, kept up until `close()`. */
export class Client extends Emitter {
  constructor(opts) {
    super();
    const base = opts.url.replace(/\/(ws)?$/, '');
    this.url = base.replace(/^http/, 'ws') + '/ws';
    this.httpUrl = base.replace(/^ws/, 'http');
    /** Transports to use, in order of preference: 'websocket', 'polling'. */
    this.transports = opts.transports || ['websocket'];
    /** The transport in use (or next to be tried). */
    this.transport = this.transports[0];
    this.io = opts.io;
    if (this.transports.includes('polling') && !this.io) throw new Error("the 'polling' transport needs `io` (a loader of socket.io-client's io)");
    this.encoding = opts.encoding || 'msgpack';
    this.token = opts.token;
    this.getToken = opts.getToken;
    this.WebSocket = opts.WebSocket || globalThis.WebSocket;
    if (!this.WebSocket && this.transport === 'websocket') throw new Error('no WebSocket: pass `WebSocket` (e.g. the `ws` package) in Node');
    this.maxPending = opts.maxPending ?? 1000;
    this.requestTimeout = opts.requestTimeout ?? 10000;
    this.backoff = { min: opts.backoffMin ?? 500, max: opts.backoffMax ?? 15000 };
    /** Joined rooms by name. */
    this.rooms = new Map();
    /** 'connecting' | 'connected' | 'disconnected' | 'closed' */
    this.state = 'connecting';
    this.user = null;
    this._ws = null;
    this._sio = null;
    // One sticky key per client, so a load balancer keeps its polls on one node.
    this._sticky = Math.random().toString(36).slice(2, 12);
    this._attempt = 0;
    this._nextId = 1;
    this._waiting = new Map(); // request id -> {resolve, reject, timer}
    this._pending = new Map(); // cid -> {target, body, resolve, reject}
    this._timer = null;
    this._cidSeq = 0;
    this._cidBase = Math.random().toString(36).slice(2, 10);
  }

  /**
   * Join `name`, replaying from `since` (default: only new messages).
   * Returns the room at once, so handlers attached now see the replay;
   * `room.ready` resolves `{seq}` when the broker has joined it.
   */
  join(name, { since } = {}) {
    let room = this.rooms.get(name);
    if (!room) {
      room = new Room(this, name);
      this.rooms.set(name, room);
    }
    if (since !== undefined) room.lastSeq = since;
    room._since = since !== undefined;
    room.ready = new Promise((resolve, reject) => {
      room._ready = { resolve, reject };
    });
    // Unhandled if nobody awaits it: the room's 'error' event says it too.
    room.ready.catch(() => {});
    if (this.state === 'connected') this._join(room).catch(() => {});
    return room;
  }

  /** Create a room you own (`{private, topic}`); resolves `{seq, ts}`. */
  async create(name, { private: priv = false, topic } = {}) {
    const f = { t: 'create', room: name, private: priv };
    if (topic !== undefined) f.topic = topic;
    const r = await this._request(f);
    return { seq: r.seq, ts: r.ts };
  }

  /** Send a direct message to `user` (a reply with `{replyTo}`); resolves `{room, seq, ts}`. */
  dm(user, body, { replyTo } = {}) {
    const target = { to: user };
    if (replyTo !== undefined) target.reply_to = replyTo;
    return this._publish(target, body);
  }

  /** Close for good (no reconnect). */
  close() {
    this.state = 'closed';
    clearTimeout(this._timer);
    if (this._ws) this._ws.close(1000);
    if (this._sio) { const s = this._sio; this._sio = null; s.disconnect(); }
    this._failAll(new Error('closed'));
    for (const p of this._pending.values()) p.reject(new Error('closed'));
    this._pending.clear();
  }

  // ---- connection ----

  async _open() {
    if (this.state === 'closed') return;
    this._setState('connecting');
    if (this.encoding === 'msgpack') await loadMsgpack();
    if (!this.token && this.getToken) {
      try { this.token = await this.getToken(); } catch (e) { return this._closed(4001, `getToken failed: ${e.message}`); }
    }
    if (this.transport === 'polling') return this._openPolling();
    let ws;
    try {
      ws = new this.WebSocket(`${this.url}?token=${encodeURIComponent(this.token || '')}`, SUBPROTOCOL[this.encoding]);
    } catch (e) {
      return this._closed(1006, e.message);
    }
    ws.binaryType = 'arraybuffer';
    this._ws = ws;
    let opened = false;
    ws.onopen = () => { opened = true; };
    ws.onmessage = (ev) => {
      let f;
      try {
        f = this.encoding === 'json' ? JSON.parse(typeof ev.data === 'string' ? ev.data : new TextDecoder().decode(ev.data))
          : msgpack.decode(new Uint8Array(ev.data));
      } catch (_) { return; }
      this._frame(f);
    };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._ws = null;
      if (!opened && ev.code === 1006 && this.transports.includes('polling')) this._probe();
      else this._closed(ev.code, ev.reason);
    };
    ws.onerror = () => {};
  }

  // The WebSocket never opened. If the server answers HTTP, something on
  // the way refuses upgrades: long-polling from now on.
  async _probe() {
    let up = false;
    try {
      const r = await fetch(this.httpUrl + '/health');
      up = r.ok || r.status === 503;
    } catch (_) { /* the server is down: back off as usual */ }
    if (!up) return this._closed(1006, 'unreachable');
    if (this.state === 'closed') return;
    this.transport = 'polling';
    this._open();
  }

  async _openPolling() {
    let io;
    try {
      io = await this.io();
    } catch (e) {
      return this._closed(1006, `could not load socket.io-client: ${e.message}`);
    }
    if (this.state === 'closed') return;
    const s = io(this.httpUrl, {
      path: '/socket.io', transports: ['polling'], auth: { token: this.token || '' },
      query: { shoal_sid: this._sticky }, reconnection: false, forceNew: true,
    });
    this._sio = s;
    let code = 0;
    let reason = '';
    s.onAny((name, payload) => {
      if (this._sio !== s) return;
      if (name === 'close') { code = payload.code; reason = payload.reason; return; }
      this._frame({ ...payload, t: name });
    });
    s.on('connect_error', (e) => {
      if (this._sio !== s) return;
      this._sio = null;
      s.disconnect();
      const m = String(e.message);
      this._closed(/revoked/.test(m) ? 4002 : /expired/.test(m) ? 4001 : 1006, m);
    });
    s.on('disconnect', (why) => {
      if (this._sio !== s) return;
      this._sio = null;
      this._closed(code || 1006, reason || why);
    });
  }

  _setState(s, detail = {}) {
    this.state = s;
    this.emit(s, detail);
  }

  _closed(code, reason) {
    for (const r of this.rooms.values()) r.joined = false;
    this._failAll(new Error('disconnected'));
    if (this.state === 'closed') return;
    let retry = true;
    let delay = this._delay();
    // 4002: the token was revoked; 4007: an operator disconnected us.
    if (code === 4002 || code === 4007) retry = false;
    else if (code === 4001) {
      this.token = null;
      retry = !!this.getToken;
    } else if (code === 1001 || code === 4006) delay = Math.min(delay, 100 + Math.random() * 400);
    this._setState('disconnected', { code, reason, willRetry: retry });
    if (!retry) {
      this.state = 'closed';
      for (const p of this._pending.values()) p.reject(new ShoalError(code, `connection ended (${code}); not retrying`));
      this._pending.clear();
      return;
    }
    this._timer = setTimeout(() => this._open(), delay);
  }

  _delay() {
    const cap = Math.min(this.backoff.max, this.backoff.min * 2 ** this._attempt++);
    return cap / 2 + Math.random() * cap / 2;
  }

  _frame(f) {
    if (f.id !== undefined && this._waiting.has(f.id)) {
      const w = this._waiting.get(f.id);
      this._waiting.delete(f.id);
      clearTimeout(w.timer);
      if (f.t === 'error') w.reject(new ShoalError(f.code, f.message));
      else w.resolve(f);
    }
    switch (f.t) {
      case 'hello':
        this.user = f.user;
        this._attempt = 0;
        this._setState('connected', { user: f.user, node: f.node });
        this._resume();
        break;
      case 'msg':
        this.rooms.get(f.room)?._deliver(f);
        if (f.room.startsWith('dm:') && !f.kind) this.emit('dm', f);
        break;
      case 'deleted': {
        // In a replay, a message deleted since: its seq is a log position.
        const r = this.rooms.get(f.room);
        if (r && f.id === undefined && f.seq > r.lastSeq) {
          r.lastSeq = f.seq;
          r.emit('deleted', { room: f.room, seq: f.seq });
        }
        break;
      }
      case 'typing': case 'presence': case 'mark':
        this.rooms.get(f.room)?.emit(f.t, f);
        break;
      case 'left': {
        // Removed by a moderator (a reply to `leave` has an id): not
        // joined again on reconnect.
        const r = this.rooms.get(f.room);
        if (r && f.id === undefined) {
          r.joined = false;
          this.rooms.delete(f.room);
          r.emit('removed', { room: f.room, reason: f.reason });
        }
        break;
      }
      case 'gap': {
        const r = this.rooms.get(f.room);
        if (r) {
          r.lastSeq = Math.max(r.lastSeq, f.to);
          r.emit('gap', f);
        }
        break;
      }
      case 'error': if (f.id === undefined) this.emit('error', new ShoalError(f.code, f.message)); break;
      default: break;
    }
  }

  async _resume() {
    // Rooms first (replay after lastSeq), then what was never acked.
    for (const room of this.rooms.values()) {
      this._join(room).catch(() => {});
    }
    for (const [cid, p] of this._pending) this._sendPub(cid, p);
  }

  async _join(room) {
    const f = { t: 'join', room: room.name };
    if (room.lastSeq > 0 || room._since) f.since = room.lastSeq;
    let j;
    try {
      j = await this._request(f);
    } catch (e) {
      if (e instanceof ShoalError) {
        // Refused (403, 404, ...): not retried on reconnect.
        this.rooms.delete(room.name);
        room._ready?.reject(e);
        room.emit('error', e);
      }
      throw e;
    }
    room.joined = true;
    if (!(room.lastSeq > 0 || room._since)) room.lastSeq = Math.max(room.lastSeq, j.seq);
    room._since = true;
    room._ready?.resolve({ seq: j.seq });
    room.emit('joined', { seq: j.seq });
    return j;
  }

  _encode(frame) {
    return this.encoding === 'json' ? JSON.stringify(frame) : msgpack.encode(frame);
  }

  _send(frame) {
    if (this._sio) {
      if (!this._sio.connected) return false;
      const { t, id, ...fields } = frame;
      if (id === undefined) this._sio.emit(t, fields);
      else {
        this._sio.emit(t, fields, (reply) => {
          if (reply && reply.error) this._frame({ ...reply.error, t: 'error', id });
          else this._frame({ ...reply, t: REPLY[t] || t, id });
        });
      }
      return true;
    }
    if (!this._ws || this._ws.readyState !== 1) return false;
    this._ws.send(this._encode(frame));
    return true;
  }

  _request(frame) {
    return new Promise((resolve, reject) => {
      const id = this._nextId++;
      frame.id = id;
      const timer = setTimeout(() => {
        this._waiting.delete(id);
        reject(new Error(`no reply to ${frame.t} within ${this.requestTimeout} ms`));
      }, this.requestTimeout);
      this._waiting.set(id, { resolve, reject, timer });
      if (!this._send(frame)) {
        clearTimeout(timer);
        this._waiting.delete(id);
        reject(new Error('not connected'));
      }
    });
  }

  _failAll(err) {
    for (const w of this._waiting.values()) { clearTimeout(w.timer); w.reject(err); }
    this._waiting.clear();
  }

  _publish(target, body) {
    if (this.state === 'closed') return Promise.reject(new Error('closed'));
    if (this._pending.size >= this.maxPending) {
      return Promise.reject(new Error(`${this.maxPending} publishes already wait for their ack`));
    }
    const cid = `${this._cidBase}-${++this._cidSeq}`;
    return new Promise((resolve, reject) => {
      const p = { target, body, resolve, reject };
      this._pending.set(cid, p);
      this._sendPub(cid, p);
    });
  }

  _sendPub(cid, p) {
    const id = this._nextId++;
    const frame = { t: 'pub', id, cid, body: p.body, ...p.target };
    p.id = id;
    if (!this._send(frame)) return; // sent again after the reconnect
    // The ack (or error) comes as a frame with this id.
    const done = (f) => {
      this._pending.delete(cid);
      if (f.t === 'error') p.reject(new ShoalError(f.code, f.message));
      else p.resolve({ room: f.room, seq: f.seq, ts: f.ts });
    };
    this._waiting.set(id, {
      resolve: done,
      reject: (e) => {
        // Disconnected before the ack: kept, sent again on reconnect.
        if (e instanceof ShoalError) { this._pending.delete(cid); p.reject(e); }
      },
      timer: null,
    });
  }
}

/** Connect to a broker: `{url, token | getToken, encoding?, WebSocket?}`. */
export function connect(opts) {
  const c = new Client(opts);
  c._open();
  return c;
}
