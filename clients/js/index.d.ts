// Types of @shoal/client (Shoal protocol shoal.v1; see proto/PROTOCOL.md).

export type Encoding = 'msgpack' | 'json';
export type Body = null | boolean | number | string | Body[] | { [key: string]: Body };

export interface ConnectOptions {
  /** Broker base URL: http(s)://host:port or ws(s)://host:port/ws. */
  url: string;
  /** A token (from POST /api/login or your issuer). */
  token?: string;
  /** Called for a token before each connect that has none (after 4001). */
  getToken?: () => Promise<string> | string;
  /** Frames on the wire (default msgpack). */
  encoding?: Encoding;
  /** A WebSocket constructor where there is no global one (Node: `ws`). */
  WebSocket?: unknown;
  /** Publishes that may wait for their ack at once (default 1000). */
  maxPending?: number;
  /** Request timeout, ms (default 10000). */
  requestTimeout?: number;
  /** Reconnect backoff bounds, ms (default 500 and 15000). */
  backoffMin?: number;
  backoffMax?: number;
  /**
   * Transports in order of preference (default ['websocket']). With
   * 'polling' listed, a WebSocket that cannot open while the server answers
   * HTTP switches to Socket.IO long-polling (JSON frames as events).
   */
  transports?: Array<'websocket' | 'polling'>;
  /** Loads socket.io-client's `io` (needed when 'polling' is listed). */
  io?: () => unknown | Promise<unknown>;
}

/** The message a reply quotes. */
export interface ReplyRef { seq: number; from: string; preview: string; }
export interface Msg {
  room: string; seq: number; from: string; ts: number; body: Body;
  /** Set when this message replies to another. */
  reply_to?: ReplyRef;
  /** Members it mentions (recognised by the broker). */
  mentions?: string[];
}
/** A message as history and threads show it: its current state. */
export interface StoredMsg extends Omit<Msg, 'room'> {
  edited_ts?: number;
  reactions?: { emoji: string; count: number; me: boolean }[];
  thread?: { count: number; last_seq: number; last_ts: number };
}
/** A moderation entry by `by` (log entry `at`). */
export interface Moderation {
  room: string; kind: 'create' | 'invite' | 'kick' | 'ban' | 'unban' | 'mute' | 'unmute' | 'role' | 'owner' | 'topic';
  by: string; ts: number; at: number; user?: string; until?: number; role?: string; topic?: string; private?: boolean; reason?: string;
}
/** An edit of message `seq` (log entry `at`). */
export interface Edit { room: string; seq: number; from: string; ts: number; body: Body; mentions: string[]; at: number; }
/** A reaction added (`on`) or removed on message `seq` (log entry `at`). */
export interface ReactionEvent { room: string; seq: number; user: string; emoji: string; on: boolean; at: number; }
export interface Gap { room: string; from: number; to: number; }
export interface Typing { room: string; user: string; }
export interface Presence { room: string; user: string; online: boolean; }
export interface Mark { room: string; user: string; seq: number; state: 'delivered' | 'read'; }
/** Message `seq` was deleted (by `by`, as log entry `at`; both absent in a replay of a message deleted before). */
export interface Deleted { room: string; seq: number; by?: string; at?: number; }
export interface Receipt { user: string; delivered: number; read: number; }
export interface Ack { room: string; seq: number; ts: number; }
export interface Disconnected { code: number; reason?: string; willRetry: boolean; }

export class ShoalError extends Error {
  /** The error code (PROTOCOL.md §3) or close code. */
  code: number;
}

export interface Room {
  readonly name: string;
  /** Resolves when the broker joined the room (after the replay). */
  readonly ready: Promise<{ seq: number }>;
  /** Last seq delivered to the app. */
  readonly lastSeq: number;
  on(event: 'message', fn: (m: Msg) => void): () => void;
  on(event: 'typing', fn: (t: Typing) => void): () => void;
  on(event: 'presence', fn: (p: Presence) => void): () => void;
  on(event: 'mark', fn: (m: Mark) => void): () => void;
  on(event: 'deleted', fn: (d: Deleted) => void): () => void;
  on(event: 'edit', fn: (e: Edit) => void): () => void;
  on(event: 'reaction', fn: (r: ReactionEvent) => void): () => void;
  on(event: 'gap', fn: (g: Gap) => void): () => void;
  /** A moderation entry (PROTOCOL.md §5b): `kind` and its body's fields. */
  on(event: 'moderation', fn: (m: Moderation) => void): () => void;
  /** A moderator removed you (`reason`: 'kick' | 'ban'); not rejoined. */
  on(event: 'removed', fn: (r: { room: string; reason?: string }) => void): () => void;
  on(event: 'joined', fn: (j: { seq: number }) => void): () => void;
  on(event: 'error', fn: (e: Error) => void): () => void;
  publish(body: Body, opts?: { replyTo?: number }): Promise<Ack>;
  edit(seq: number, body: Body): Promise<{ seq: number; ts: number }>;
  react(seq: number, emoji: string): Promise<{ seq: number; ts: number }>;
  unreact(seq: number, emoji: string): Promise<{ seq: number; ts: number }>;
  thread(seq: number, opts?: { before?: number; limit?: number }): Promise<{ messages: StoredMsg[]; more: boolean }>;
  moderate(action: 'invite' | 'kick' | 'ban' | 'unban' | 'mute' | 'unmute' | 'role' | 'owner' | 'topic',
    what?: { user?: string; until?: number; role?: 'admin' | 'member'; topic?: string; reason?: string }): Promise<{ seq: number; ts: number }>;
  typing(): void;
  mark(seq: number, state?: 'delivered' | 'read'): void;
  history(opts?: { before?: number; limit?: number }): Promise<{ messages: StoredMsg[]; more: boolean }>;
  members(): Promise<{ users: string[]; receipts: Receipt[] }>;
  delete(seq: number): Promise<void>;
  leave(): Promise<void>;
}

export class Client {
  readonly state: 'connecting' | 'connected' | 'disconnected' | 'closed';
  /** The transport in use: 'websocket' or 'polling'. */
  readonly transport: 'websocket' | 'polling';
  readonly user: string | null;
  readonly rooms: Map<string, Room>;
  on(event: 'connecting', fn: () => void): () => void;
  on(event: 'connected', fn: (c: { user: string; node: string }) => void): () => void;
  on(event: 'disconnected', fn: (d: Disconnected) => void): () => void;
  on(event: 'dm', fn: (m: Msg) => void): () => void;
  on(event: 'error', fn: (e: ShoalError) => void): () => void;
  /** Join at once (attach handlers, then `await room.ready`). */
  join(room: string, opts?: { since?: number }): Room;
  dm(user: string, body: Body, opts?: { replyTo?: number }): Promise<Ack>;
  /** Create a room you own; private rooms admit members only. */
  create(room: string, opts?: { private?: boolean; topic?: string }): Promise<{ seq: number; ts: number }>;
  close(): void;
}

export function connect(opts: ConnectOptions): Client;
