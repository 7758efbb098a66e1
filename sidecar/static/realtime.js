/**
 * realtime.js: the browser client of the realtime sidecar. One ES module, no build step, no dependencies.
 *
 *   import { Realtime } from "/static/realtime.js";
 *
 *   const rt = new Realtime({ url: "https://rt.example.com", token: () => fetchToken() });
 *   rt.addEventListener("connection", (e) => (badge.textContent = e.detail.status));
 *   const sprint = rt.subscribe("sprint:7", { mode: "diff", onState: (state) => render(state) });
 *   // ... later
 *   sprint.unsubscribe();
 *   rt.close();
 *
 * What it does for you (docs/client-js.md is the guide, docs/protocol.md the wire format):
 * - WebSocket first; Server-Sent Events when a WebSocket cannot be opened (a proxy refusing upgrades, say).
 * - A local state per channel: RFC 7386 merge patches applied in order, `seq` checked for holes and `epoch` for
 *   lost history; either one makes the channel re-sync from `GET /channels/<c>/state` (never a silent hole).
 * - Reconnects with exponential backoff and full jitter, never sooner than the server asks (a 503's
 *   Retry-After, the SSE `retry:` field, a WebSocket close 1013 "retry in N s"), to the next of several URLs,
 *   and resumes every channel from its last position; a message seen twice is applied once.
 * - Poke mode pulls the state itself, with If-None-Match, when a poke comes (the server spreads pokes out).
 */

export const MODES = ["poke", "state", "event", "diff"];
const CHANNEL_RE = /^[A-Za-z0-9_\-:.@]{1,200}$/;
const OPEN_TIMEOUT_MS = 10000; // a WebSocket or stream that has not opened by then counts as refused
const STABLE_MS = 10000; // a connection that lived this long resets the backoff
const MAX_BUFFER = 10000; // messages held per channel while it re-syncs (MAX_HELD in sidecar/core/stream.py)
const UNKNOWN = { id: "0-0", seq: 0, epoch: "" }; // the position of a channel nothing was published on

/** RFC 7386 section 2, MergePatch(target, patch): null removes a member, an object merges, anything else replaces. */
export function mergePatch(target, patch) {
  if (!isObject(patch)) return patch;
  const result = isObject(target) ? { ...target } : {};
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) {
      delete result[key];
      continue;
    }
    const merged = mergePatch(Object.hasOwn(result, key) ? result[key] : undefined, value);
    // defineProperty: a "__proto__" member is data, not the prototype setter.
    Object.defineProperty(result, key, { value: merged, enumerable: true, writable: true, configurable: true });
  }
  return result;
}

/** Compare two Redis stream ids ("1700000000000-3"): negative, zero or positive. */
export function compareIds(a, b) {
  const [am, an] = a.split("-").map(Number);
  const [bm, bn] = b.split("-").map(Number);
  return am - bm || an - bn;
}

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Milliseconds from a Retry-After header (seconds or an HTTP date); 0 when absent or unreadable. */
function retryAfterMs(value) {
  if (!value) return 0;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const when = Date.parse(value);
  return Number.isFinite(when) ? Math.max(0, when - Date.now()) : 0;
}

/** The hint in a close reason or error message such as "retry in 2.5 s" or "retry after 800 ms". */
function hintMs(text) {
  const m = /retry\D{0,12}?(\d+(?:\.\d+)?)\s*(ms|s)?/i.exec(text || "");
  if (!m) return 0;
  return Number(m[1]) * (m[2] === "ms" ? 1 : 1000);
}

/** Why a connection could not open or ended; `retryAfter` (ms) is the server's hint, 0 if none. */
class Failure extends Error {
  constructor(message, { retryAfter = 0, status = 0, refused = false } = {}) {
    super(message);
    this.retryAfter = retryAfter;
    this.status = status;
    this.refused = refused; // never opened: for a WebSocket, the cue to try SSE
  }
}

/**
 * A client of one sidecar (or several replicas of it). It connects when the first channel is subscribed.
 *
 * Options:
 * - `url`: the sidecar's base URL, or a list of replicas tried in turn (default: this page's origin);
 * - `token`: a function returning a token (or a promise of one), called before every connection and pull;
 *   sent as `Authorization: Bearer` over HTTP and as the first WebSocket frame, never in a URL;
 * - `transports`: `["ws", "sse"]` by default; `["sse"]` skips the WebSocket;
 * - `backoff`: `{ base: 500, cap: 30000 }` ms: the n-th retry waits random(0, min(cap, base * 2^n));
 * - `idleTimeout`: ms without a byte before a connection is presumed dead (45000; the server sends keep-alives).
 *
 * Events (it is an EventTarget): `connection` with `detail = {status, transport, url, delay, reason}`, status
 * one of "connecting", "open", "reconnecting", "closed"; `error` with `detail = {code, message, channel}`.
 * `stats` counts frames, messages, duplicates dropped, re-syncs, pulls and reconnects.
 */
export class Realtime extends EventTarget {
  constructor(options = {}) {
    super();
    const urls = [].concat(options.url || globalThis.location?.origin || []);
    if (!urls.length) throw new Error("realtime.js: give the sidecar's url");
    this.urls = urls.map((u) => u.replace(/\/+$/, ""));
    this.tokenSource = options.token || null;
    this.transports = options.transports || ["ws", "sse"];
    this.backoff = { base: 500, cap: 30000, ...options.backoff };
    this.idleTimeout = options.idleTimeout || 45000;
    this.channels = new Map(); // name -> Subscription
    this.status = "idle";
    this.stats = { frames: 0, messages: 0, published: 0, duplicates: 0, resyncs: 0, pulls: 0, reconnects: 0 };
    this.transport = null; // the open transport
    this.opening = null; // the transport being opened (its frames count already)
    this.urlIndex = 0;
    this.failures = 0; // consecutive failed attempts: the backoff exponent
    this.sseOnly = false; // a WebSocket was refused where SSE worked: stay on SSE
    this.timer = null;
    this.closed = false;
    this.watchdog = setInterval(() => this._checkIdle(), 5000);
  }

  /**
   * Subscribe to `channel` in one of the four modes (docs/protocol.md):
   * - `diff` (default): state kept from merge patches; `onState(state, msg)` after each change;
   * - `state`: each message carries the whole state; `onState` as above;
   * - `event`: the business events only; `onEvent(name, data, msg)`;
   * - `poke`: "it changed"; the state is pulled from the server (If-None-Match), then `onState`.
   * Every mode: `onMessage(msg)` for each message applied, `onReset({reason, ...})` when continuity broke (a gap
   * in history, a lost epoch, a hole) and the channel restarted from a snapshot (or, event channels, from now),
   * `onError({code, message})` when the server refuses the channel. One subscription per channel: subscribing
   * again replaces it. Returns the {@link Subscription}: `.state`, `.position`, `.unsubscribe()`.
   */
  subscribe(channel, { mode = "diff", onMessage, onState, onEvent, onReset, onError } = {}) {
    if (!CHANNEL_RE.test(channel)) throw new Error(`realtime.js: bad channel name ${JSON.stringify(channel)}`);
    if (!MODES.includes(mode)) throw new Error(`realtime.js: mode is one of ${MODES.join(", ")}`);
    if (this.closed) throw new Error("realtime.js: this client is closed");
    this.channels.get(channel)?.unsubscribe();
    const sub = new Subscription(this, channel, mode, { onMessage, onState, onEvent, onReset, onError });
    this.channels.set(channel, sub);
    const transport = this.transport || this.opening;
    if (transport) transport.add(sub);
    else this._connectSoon(0);
    return sub;
  }

  /** Stop listening to `channel` (same as `subscription.unsubscribe()`). */
  unsubscribe(channel) {
    this.channels.get(channel)?.unsubscribe();
  }

  /** Close the connection and forget every subscription. */
  close() {
    this.closed = true;
    clearTimeout(this.timer);
    clearInterval(this.watchdog);
    for (const sub of this.channels.values()) sub._dispose();
    this.channels.clear();
    this.transport?.close();
    this.opening?.close();
    this.transport = this.opening = null;
    this._status("closed", {});
  }

  // -- connecting ---------------------------------------------------------------------------------------------
  _connectSoon(delay) {
    if (this.transport || this.opening || this.timer || this.closed) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      this._connect();
    }, delay);
  }

  async _connect() {
    if (this.transport || this.opening || this.closed || !this.channels.size) return;
    let failure = null;
    // Every replica in turn, starting with the last that worked; on each, WebSocket then SSE.
    for (let i = 0; i < this.urls.length && !this.closed; i++) {
      const url = this.urls[(this.urlIndex + i) % this.urls.length];
      for (const kind of this.sseOnly ? ["sse"] : this.transports) {
        this._status("connecting", { transport: kind, url });
        const transport = kind === "ws" ? new WsTransport(this, url) : new SseTransport(this, url);
        this.opening = transport;
        try {
          await transport.open(await this._token());
        } catch (err) {
          transport.close();
          this.opening = null;
          failure = err instanceof Failure ? err : new Failure(String(err?.message || err));
          if (kind === "ws" && failure.refused) continue; // a refused WebSocket: SSE on the same URL
          break; // an HTTP error (503, 401, ...) answers for the URL as a whole
        }
        this.opening = null;
        if (this.closed) return transport.close();
        if (kind === "sse" && this.transports[0] === "ws") this.sseOnly = true;
        this.transport = transport;
        this.urlIndex = (this.urlIndex + i) % this.urls.length;
        this.openedAt = Date.now();
        this._status("open", { transport: kind, url });
        return;
      }
      if (failure?.retryAfter) break; // the server said when: wait, rather than hammer the next replica
    }
    if (this.closed) return;
    this.urlIndex = (this.urlIndex + 1) % this.urls.length;
    this.failures += 1;
    this._retry(failure || new Failure("no transport"));
  }

  /** A transport that was open has ended: reconnect (after the backoff and any hint). */
  _lost(transport, failure) {
    if (transport !== this.transport) return;
    transport.close();
    this.transport = null;
    this.failures = Date.now() - this.openedAt >= STABLE_MS ? 1 : this.failures + 1;
    this._retry(failure);
  }

  _retry(failure) {
    const { base, cap } = this.backoff;
    const jitter = Math.random() * Math.min(cap, base * 2 ** this.failures); // "full jitter"
    const delay = Math.max(failure.retryAfter, jitter);
    this.stats.reconnects += 1;
    this._status("reconnecting", { delay: Math.round(delay), reason: failure.message });
    this._connectSoon(delay);
  }

  _checkIdle() {
    const t = this.transport;
    if (!t) return;
    if (Date.now() - t.lastRx > this.idleTimeout) this._lost(t, new Failure("no data: connection presumed dead"));
    else t.keepalive?.();
  }

  async _token() {
    const source = this.tokenSource;
    return typeof source === "function" ? await source() : source;
  }

  async _headers(extra = {}) {
    const token = await this._token();
    return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
  }

  _status(status, detail) {
    this.status = status;
    this.dispatchEvent(new CustomEvent("connection", { detail: { status, ...detail } }));
  }

  _error(detail) {
    this.dispatchEvent(new CustomEvent("error", { detail }));
  }

  // -- frames from either transport --------------------------------------------------------------------------
  _frame(frame, transport) {
    if (transport !== this.transport && transport !== this.opening) return; // a closed one's leftovers
    this.stats.frames += 1;
    const sub = frame.channel ? this.channels.get(frame.channel) : null;
    switch (frame.type) {
      case "message":
      case "subscribed":
      case "snapshot":
      case "reset":
        return sub?._frame(frame);
      case "authorized":
        return transport.authorized?.(frame);
      case "error":
        return this._serverError(frame, sub, transport);
    }
  }

  _serverError(frame, sub, transport) {
    if (frame.code === "rate-limited" && sub) {
      const again = () => this.channels.get(sub.channel) === sub && this.transport?.add(sub);
      setTimeout(again, hintMs(frame.message) || 1000);
      return;
    }
    if (frame.code === "token-expired") {
      this._lost(transport, new Failure("token expired")); // reconnect at once with a fresh token
      return;
    }
    sub?.handlers.onError?.(frame);
    this._error(frame);
  }

  /** `GET /channels/<c>/state`: `{id, seq, epoch, state}`, null if the channel is unknown, or "unchanged" (304). */
  async _pull(channel, etag) {
    const url = this.urls[this.urlIndex];
    const headers = await this._headers(etag ? { "If-None-Match": etag } : {});
    const signal = AbortSignal.timeout(OPEN_TIMEOUT_MS);
    const path = `/channels/${encodeURIComponent(channel)}/state`;
    const res = await fetch(url + path, { headers, signal, cache: "no-store" });
    this.stats.pulls += 1;
    if (res.status === 304) return "unchanged";
    if (res.status === 404) return null;
    if (!res.ok) {
      const retryAfter = retryAfterMs(res.headers.get("Retry-After"));
      throw new Failure(`state of ${channel}: HTTP ${res.status}`, { status: res.status, retryAfter });
    }
    return { ...(await res.json()), etag: res.headers.get("ETag") };
  }
}

/**
 * One channel's position and local state under the client rules of docs/protocol.md ("What a client must do"),
 * with no I/O: frames in, frames for the user out; tests/vectors/protocol.json checks it, and the Python client's
 * `Tracker` (sidecar/core/stream.py) against the same cases.
 *
 *   const t = new ChannelTracker("sprint:7", "diff");
 *   for (const f of t.pulled(answer)) t.apply(f);    // the answer of GET /channels/<c>/state (null: 404)
 *   for (const f of t.frame(msg)) t.apply(f);        // a server frame: message, snapshot, reset, subscribed
 *   if (t.stale) ...                                 // "hole" or "epoch": pull, and give the answer to pulled()
 *
 * `frame()` and `pulled()` return the frames to hand over (`message`, `snapshot`, `reset`, with the `reason` of
 * a re-sync); `apply(f)` brings `state` up to a frame as it is handed over.
 */
export class ChannelTracker {
  constructor(channel, mode) {
    this.channel = channel;
    this.mode = mode;
    this.stateful = mode === "diff" || mode === "state";
    this.id = null; // the position: null until known, then the last id, with its seq and epoch
    this.seq = 0;
    this.epoch = "";
    this.state = undefined; // undefined until known; diff and state modes only
    this.stale = ""; // why the channel must be pulled ("hole", "epoch"); "" while in sync
    this.held = []; // messages that came while stale: those that follow the restart are applied after it
    this.duplicates = 0;
  }

  frame(f) {
    if (f.type === "message") return this._message(f);
    // Older than what we hold: dropped, unless it has a reason (the server's word that it lost some: a failover).
    if (this.id !== null && f.epoch === this.epoch && compareIds(f.id, this.id) < 0 && !("reason" in f)) return [];
    if (f.type === "subscribed") {
      if (!("state" in f)) {
        this._place(f);
        return [];
      }
      const { mode, ...snapshot } = f;
      return this._restart({ ...snapshot, type: "snapshot" });
    }
    return f.type === "snapshot" || f.type === "reset" ? this._restart(f) : [];
  }

  pulled(answer) {
    const a = answer || { ...UNKNOWN, state: null };
    const withState = this.stateful && a.state != null;
    const body = { type: withState ? "snapshot" : "reset", channel: this.channel, id: a.id, seq: a.seq, epoch: a.epoch };
    if (withState) body.state = a.state;
    if (this.stale) body.reason = this.stale;
    else if (!withState) {
      this._place(body); // the first pull of a channel without state: nothing to hand over
      if (this.stateful) this.state = null;
      return [];
    }
    return this._restart(body);
  }

  apply(f) {
    if (!this.stateful) return;
    if (f.type !== "message") this.state = f.state ?? null;
    else if ("diff" in f) this.state = mergePatch(this.state ?? null, f.diff);
    else if ("state" in f) this.state = f.state;
  }

  _message(f) {
    if (this.stale) {
      if (this.held.length >= MAX_BUFFER) this.held.length = 0; // the pull covers them; a hole after it pulls again
      this.held.push(f);
      return [];
    }
    if (this.id === null) return []; // before this subscription's start: a leftover of a replaced one
    if (f.epoch === this.epoch && compareIds(f.id, this.id) <= 0) {
      this.duplicates += 1; // a resumed stream overlapping what we saw: applied once
      return [];
    }
    if (this.epoch && f.epoch !== this.epoch) return this._stale("epoch", f);
    if ((f.seq_from ?? f.seq) !== this.seq + 1) return this._stale("hole", f); // seq_from: a coalesced frame
    this._place(f);
    return [f];
  }

  _stale(reason, f) {
    this.stale = reason;
    this.held = [f];
    return [];
  }

  _place(f) {
    this.id = f.id;
    this.seq = f.seq;
    this.epoch = f.epoch;
  }

  _restart(f) {
    this._place(f);
    const held = this.held;
    this.stale = "";
    this.held = [];
    const out = [f];
    for (const m of held) {
      // One that does not follow is covered by the restart, or lost by the server (a failover's lost tail):
      // pulling again for it could loop. A hole after the restart shows on the next live message.
      const follows = (m.seq_from ?? m.seq) === this.seq + 1 && compareIds(m.id, this.id) > 0;
      if (m.epoch === this.epoch && follows) {
        this._place(m);
        out.push(m);
      }
    }
    return out;
  }
}

/** One channel's subscription and its local state. Returned by {@link Realtime#subscribe}. */
export class Subscription {
  constructor(rt, channel, mode, handlers) {
    this.rt = rt;
    this.channel = channel;
    this.mode = mode;
    this.handlers = handlers;
    this.tracker = new ChannelTracker(channel, mode);
    this.state = undefined; // undefined until known; diff/state/poke modes only
    this.etag = null; // poke mode: the state's ETag, for If-None-Match
    this.pulledAt = null; // poke mode: the position of the last state pulled
    this.resyncedAt = 0;
    this.pullTimer = null;
    this.pulling = false;
    this.pullAgain = false;
    this.active = true;
  }

  /** The last id applied, with its seq and epoch (null until known). */
  get id() {
    return this.tracker.id;
  }

  get seq() {
    return this.tracker.seq;
  }

  get epoch() {
    return this.tracker.epoch;
  }

  get position() {
    return this.id === null ? null : { id: this.id, seq: this.seq, epoch: this.epoch };
  }

  unsubscribe() {
    if (!this.active) return;
    this._dispose();
    if (this.rt.channels.get(this.channel) === this) this.rt.channels.delete(this.channel);
    (this.rt.transport || this.rt.opening)?.remove(this);
  }

  _dispose() {
    this.active = false;
    clearTimeout(this.pullTimer);
  }

  /** The channel's position (and state) before a stream resumes it: SSE reads it here, the WebSocket gets it. */
  async _ensurePosition() {
    if (this.id !== null) return;
    const snap = await this.rt._pull(this.channel);
    if (this.id !== null || !this.active) return;
    this._handOver(this.tracker.pulled(snap));
    if (this.mode === "poke") this._pokeState(snap);
  }

  /** A server frame for this channel: message, subscribed, snapshot or reset. */
  _frame(f) {
    const fresh = this.id === null;
    const { duplicates, stale } = this.tracker;
    this._handOver(this.tracker.frame(f));
    this.rt.stats.duplicates += this.tracker.duplicates - duplicates;
    if (f.type === "subscribed" && fresh && this.mode === "poke") this._schedulePull(0);
    if (!stale && this.tracker.stale) this._resync();
  }

  /** Apply the frames the tracker hands over, and tell the handlers. */
  _handOver(frames) {
    const { handlers, rt } = this;
    for (const f of frames) {
      const before = this.tracker.state;
      this.tracker.apply(f);
      if (this.tracker.stateful) this.state = this.tracker.state;
      if (f.type !== "message") {
        if (this.tracker.stateful && (f.type === "snapshot" || before != null)) handlers.onState?.(this.state, f);
        if (f.reason || f.type === "reset") handlers.onReset?.({ reason: f.reason || "reset", ...this._where(f) });
        if (f.type === "reset" && this.mode === "poke") this._schedulePull(0);
        continue;
      }
      rt.stats.messages += 1;
      rt.stats.published += f.seq - (f.seq_from ?? f.seq) + 1;
      handlers.onMessage?.(f, this);
      if (this.mode !== "poke") handlers.onEvent?.(f.event, f.data, f);
      if (this.tracker.stateful && ("diff" in f || "state" in f)) handlers.onState?.(this.state, f);
      // The server spreads pokes over time (herd control): a poke arrives when it is this client's turn to pull.
      const p = this.pulledAt;
      const seen = p && p.epoch === f.epoch && compareIds(f.id, p.id) <= 0; // the last pull read it already
      if (this.mode === "poke" && !seen) this._schedulePull(0);
    }
  }

  _where(f) {
    return { channel: this.channel, id: f.id, seq: f.seq, epoch: f.epoch };
  }

  /** The tracker found a hole or a new epoch: read the state, and restart the channel from it. */
  async _resync() {
    this.rt.stats.resyncs += 1;
    // At most one re-sync of a channel a second: a stream of holes is not a stream of pulls.
    const since = Date.now() - this.resyncedAt;
    if (since < 1000) await sleep(1000 - since + Math.random() * 500);
    for (let attempt = 0; this.active && this.tracker.stale; attempt++) {
      try {
        const snap = await this.rt._pull(this.channel);
        this.resyncedAt = Date.now();
        if (!this.active || !this.tracker.stale) return; // a snapshot or reset from the server re-synced it
        this._handOver(this.tracker.pulled(snap)); // null: the channel expired, or was lost with Redis
        return;
      } catch (err) {
        await sleep(Math.max(err.retryAfter || 0, Math.random() * Math.min(10000, 500 * 2 ** attempt)));
      }
    }
  }

  // -- poke mode ----------------------------------------------------------------------------------------------
  _schedulePull(delay) {
    // One pull at a time: a poke during a pull gets one more pull after it (304 if that one read it already).
    if (this.pulling) this.pullAgain = true;
    else if (!this.pullTimer) this.pullTimer = setTimeout(() => this._pullNow(0), delay);
  }

  async _pullNow(attempt) {
    this.pullTimer = null;
    this.pulling = true;
    let snap;
    try {
      snap = await this.rt._pull(this.channel, this.etag);
    } catch (err) {
      this.pulling = false;
      const delay = Math.max(err.retryAfter || 0, Math.random() * Math.min(10000, 500 * 2 ** attempt));
      this.pullTimer = setTimeout(() => this._pullNow(attempt + 1), delay);
      return;
    }
    this.pulling = false;
    if (!this.active) return;
    if (snap !== "unchanged") this._pokeState(snap);
    if (this.pullAgain) {
      this.pullAgain = false;
      this._schedulePull(0);
    }
  }

  /** A state pulled in poke mode; null: the channel expired, or was lost with Redis. */
  _pokeState(snap) {
    if (snap === null && this.state == null) return;
    this.pulledAt = snap; // pokes up to its position are answered by this pull: they need no pull of their own
    this.etag = snap?.etag ?? null;
    this.state = snap ? snap.state : null;
    this.handlers.onState?.(this.state, snap);
  }
}

// -- transports: open(token), add(sub), remove(sub), close(), lastRx ------------------------------------------

/** One WebSocket for every channel: `{"op": "subscribe", channel, mode, since, epoch}` frames (docs/protocol.md). */
class WsTransport {
  constructor(rt, url) {
    this.rt = rt;
    this.kind = "ws";
    this.url = url.replace(/^http/, "ws") + "/ws";
    this.ws = null;
    this.lastRx = this.lastTx = Date.now();
    this.reauth = null;
  }

  open(token) {
    return new Promise((resolve, reject) => {
      const ws = (this.ws = new WebSocket(this.url));
      let opened = false;
      const timer = setTimeout(() => ws.close(), OPEN_TIMEOUT_MS);
      ws.onopen = () => {
        opened = true;
        clearTimeout(timer);
        if (token) this._send({ op: "auth", token });
        for (const sub of this.rt.channels.values()) this.add(sub);
        resolve();
      };
      ws.onmessage = (e) => {
        this.lastRx = Date.now();
        this.rt._frame(JSON.parse(e.data), this);
      };
      ws.onclose = (e) => {
        clearTimeout(timer);
        // RFC 6455 7.4.1: 1013 "try again later"; its reason may say when.
        const retryAfter = hintMs(e.reason) || (e.code === 1013 ? 1000 : 0);
        const failure = new Failure(`WebSocket closed (${e.code} ${e.reason})`, { retryAfter, refused: !opened });
        if (opened) this.rt._lost(this, failure);
        else reject(failure);
      };
    });
  }

  add(sub) {
    const frame = { op: "subscribe", channel: sub.channel, mode: sub.mode };
    if (sub.id !== null) Object.assign(frame, { since: sub.id, epoch: sub.epoch }); // resume: only what we missed
    this._send(frame);
  }

  remove(sub) {
    this._send({ op: "unsubscribe", channel: sub.channel });
  }

  /** `{"type": "authorized", "expires": <epoch s>}`: send a fresh token a little before this one expires. */
  authorized(frame) {
    clearTimeout(this.reauth);
    if (!frame.expires) return;
    const wait = Math.max(1000, (frame.expires * 1000 - Date.now()) * 0.8);
    this.reauth = setTimeout(async () => {
      const token = await this.rt._token().catch(() => null);
      if (token) this._send({ op: "auth", token });
    }, wait);
  }

  keepalive() {
    // The server's pings are invisible to page scripts; a ping op gets a pong frame, which proves the link.
    if (Date.now() - this.lastTx > this.rt.idleTimeout / 3) this._send({ op: "ping" });
  }

  _send(frame) {
    if (this.ws?.readyState !== WebSocket.OPEN) return;
    this.lastTx = Date.now();
    this.ws.send(JSON.stringify(frame));
  }

  close() {
    clearTimeout(this.reauth);
    if (this.ws) {
      this.ws.onclose = this.ws.onmessage = this.ws.onopen = null;
      this.ws.close();
    }
  }
}

/**
 * Server-Sent Events, one stream per mode (`GET /sse?channel=a&channel=b&mode=diff`), read with fetch() rather
 * than EventSource: EventSource hides the response status and headers (no Retry-After), hides `retry:`, and
 * reconnects on its own without a fresh token or backoff. The wire format is the same SSE.
 * A stream resumes with `last_event_id`, the cursor of every channel's position (each channel's position is
 * read from the state endpoint before it first joins a stream); adding or removing a channel reopens the stream.
 */
class SseTransport {
  constructor(rt, url) {
    this.rt = rt;
    this.kind = "sse";
    this.url = url;
    this.streams = new Map(); // mode -> { channels, controller }
    this.lastRx = Date.now();
    this.retryMs = 0; // the server's `retry:`: the least wait before reconnecting a stream that ended
    this.queue = Promise.resolve();
    this.closed = false;
  }

  open() {
    return this._sync();
  }

  add() {
    this._syncLater();
  }

  remove() {
    this._syncLater();
  }

  close() {
    this.closed = true;
    for (const stream of this.streams.values()) stream.controller.abort();
    this.streams.clear();
  }

  _syncLater() {
    // Subscribing to ten channels in a row reopens the stream once: the sync runs after this task.
    this._sync().catch((err) => this.rt._lost(this, err instanceof Failure ? err : new Failure(String(err))));
  }

  _sync() {
    this.queue = this.queue.catch(() => {}).then(() => this._reconcile());
    return this.queue;
  }

  async _reconcile() {
    if (this.closed) return;
    const wanted = new Map();
    for (const sub of this.rt.channels.values()) {
      if (!wanted.has(sub.mode)) wanted.set(sub.mode, []);
      wanted.get(sub.mode).push(sub);
    }
    for (const mode of new Set([...wanted.keys(), ...this.streams.keys()])) {
      const subs = (wanted.get(mode) || []).sort((a, b) => (a.channel < b.channel ? -1 : 1));
      const current = this.streams.get(mode);
      if (current && current.channels.join() === subs.map((s) => s.channel).join()) continue;
      if (!subs.length) {
        current.controller.abort();
        this.streams.delete(mode);
        continue;
      }
      const stream = await this._openStream(mode, subs);
      current?.controller.abort(); // after the new one is up: its cursor covers what the old one may still deliver
      this.streams.set(mode, stream);
    }
  }

  async _openStream(mode, subs) {
    await Promise.all(subs.map((sub) => sub._ensurePosition()));
    const query = new URLSearchParams(subs.map((sub) => ["channel", sub.channel]));
    query.set("mode", mode);
    query.set("last_event_id", subs.map((sub) => `${sub.id}~${sub.epoch}`).join(","));
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), OPEN_TIMEOUT_MS);
    let res;
    try {
      const headers = await this.rt._headers({ Accept: "text/event-stream" });
      res = await fetch(`${this.url}/sse?${query}`, { headers, signal: controller.signal, cache: "no-store" });
    } catch (err) {
      throw new Failure(`SSE: ${err.message}`, { refused: true });
    } finally {
      clearTimeout(timer);
    }
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      controller.abort();
      const channels = subs.map((s) => s.channel);
      if (res.status === 403) this.rt._error({ code: body.error || "forbidden", message: body.message, channels });
      const retryAfter = retryAfterMs(res.headers.get("Retry-After"));
      throw new Failure(`SSE: HTTP ${res.status} ${body.error || ""}`.trim(), { status: res.status, retryAfter });
    }
    this._pump(res.body.getReader(), controller);
    return { channels: subs.map((sub) => sub.channel), controller };
  }

  async _pump(reader, controller) {
    const parser = new SseParser((type, data) => this.rt._frame({ type, ...JSON.parse(data) }, this));
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        this.lastRx = Date.now();
        parser.push(value);
        this.retryMs = parser.retry ?? this.retryMs;
      }
    } catch (err) {
      if (controller.signal.aborted) return; // we closed it
    }
    if (!controller.signal.aborted) this.rt._lost(this, new Failure("SSE stream ended", { retryAfter: this.retryMs }));
  }
}

/**
 * Server-Sent Events parsing (HTML Standard, 9.2.6 "Interpreting an event stream"): bytes in, `onEvent(type,
 * data)` out. UTF-8 with one leading BOM skipped (TextDecoder's default); lines end in CRLF, LF or a lone CR;
 * `data` lines are joined with LF; a blank line dispatches the event (none without data); an `id` with NUL and
 * a `retry` that is not all ASCII digits are ignored. `retry` and `lastEventId` hold the latest values.
 */
export class SseParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.decoder = new TextDecoder();
    this.buffer = "";
    this.cr = false; // the last character was a CR: a LF that follows ends no line
    this.event = "";
    this.data = [];
    this.id = ""; // the last event ID buffer
    this.lastEventId = ""; // as of the last dispatch
    this.retry = null; // ms
  }

  push(bytes) {
    let text = this.decoder.decode(bytes, { stream: true });
    if (!text) return; // half a character
    if (this.cr && text[0] === "\n") text = text.slice(1);
    this.cr = text.endsWith("\r");
    const lines = (this.buffer + text).split(/\r\n|\r|\n/);
    this.buffer = lines.pop();
    for (const line of lines) this._line(line);
  }

  _line(line) {
    if (line === "") {
      this.lastEventId = this.id;
      if (this.data.length) this.onEvent(this.event || "message", this.data.join("\n"));
      this.event = "";
      this.data = [];
      return;
    }
    if (line[0] === ":") return; // a comment: the server's keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.id = value;
    else if (field === "retry" && /^[0-9]+$/.test(value)) this.retry = Number(value);
    // `id:` is the connection's cursor; we keep each channel's position from the messages themselves.
  }
}
