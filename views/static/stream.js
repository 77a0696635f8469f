// A small client for the worker's WebSocket stream, `GET /stream` (docs/stream.md).
//
//   const client = new StreamClient({ token });
//   const sub = client.subscribe({ channel: 'bars', symbol: 'BTCUSDT', interval: '1m' },
//                                { onFrame(frame) {...}, onError(frame) {...} });
//   sub.close();   // unsubscribe
//
// What it takes care of:
// * reconnects with exponential backoff (with jitter) and subscribes everything again;
//   each (re)subscription starts with a `snapshot` frame, which the handler receives like
//   any other frame, so it can replace its state;
// * checks each subscription's `seq` (1 for the snapshot, then +1 per frame): a gap means
//   a frame was lost, so the subscription is renewed to get a fresh snapshot;
// * sends `{"op": "auth", "token"}` as the first frame when a token is given (browsers
//   cannot set the handshake's Authorization header);
// * renews a subscription refused with `unavailable` (Redis or the database failed while
//   the server built the snapshot) after a short delay.

const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 10_000;
const RETRY_UNAVAILABLE_MS = 2_000;

/** The ws:// or wss:// URL of /stream on the page's origin (or on `baseUrl`). */
export function streamUrl(baseUrl = location.origin) {
  const url = new URL('/stream', baseUrl);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  return url.href;
}

export class StreamClient {
  /**
   * @param {object} options
   * @param {string} [options.url] WebSocket URL (default: /stream on the page's origin)
   * @param {string} [options.token] bearer token, sent as the first frame
   * @param {(status: {state: string, code?: number, reason?: string}) => void} [options.onStatus]
   *   connection state changes: 'connecting', 'open' (welcome received), 'closed'
   */
  constructor({ url = streamUrl(), token = null, onStatus = () => {} } = {}) {
    this.url = url;
    this.token = token;
    this.onStatus = onStatus;
    this.subs = new Map(); // subscription key -> Subscription
    this.byWireId = new Map(); // id on the current connection -> Subscription
    this.ws = null;
    this.welcome = null; // the server's welcome frame of the current connection
    this.backoffMs = BACKOFF_MIN_MS;
    this.reconnectTimer = null;
    this.closed = false;
    this.nextKey = 1;
    this.connect();
  }

  /**
   * Subscribe to a channel. The request is sent now if connected, else on (re)connect.
   * @param {object} request `{channel, ...fields}` of the subscribe frame, without op/id
   * @param {{onFrame: Function, onError?: Function}} handler
   * @returns {Subscription}
   */
  subscribe(request, handler) {
    const sub = new Subscription(this, `s${this.nextKey++}`, request, handler);
    this.subs.set(sub.key, sub);
    if (this.isOpen()) sub.send();
    return sub;
  }

  /** Whether the socket is open (frames can be sent). */
  isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  /** Close the connection for good (no reconnect). */
  close() {
    this.closed = true;
    clearTimeout(this.reconnectTimer);
    if (this.ws) this.ws.close(1000, 'client closed');
  }

  send(frame) {
    if (this.isOpen()) this.ws.send(JSON.stringify(frame));
  }

  connect() {
    this.onStatus({ state: 'connecting' });
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.onopen = () => {
      if (this.token) ws.send(JSON.stringify({ op: 'auth', token: this.token }));
      this.byWireId.clear();
      for (const sub of this.subs.values()) sub.send();
    };
    ws.onmessage = (event) => this.dispatch(event.data);
    // onerror is always followed by onclose, which reconnects
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.welcome = null;
      this.onStatus({ state: 'closed', code: event.code, reason: event.reason });
      if (!this.closed) this.scheduleReconnect();
    };
  }

  scheduleReconnect() {
    const jitter = 0.5 + Math.random() / 2; // 50-100 % of the backoff, so clients spread out
    this.reconnectTimer = setTimeout(() => this.connect(), this.backoffMs * jitter);
    this.backoffMs = Math.min(this.backoffMs * 2, BACKOFF_MAX_MS);
  }

  dispatch(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return; // the server sends JSON only; ignore anything else
    }
    if (frame.type === 'welcome') {
      this.welcome = frame;
      this.backoffMs = BACKOFF_MIN_MS;
      this.onStatus({ state: 'open', welcome: frame });
      return;
    }
    const sub = frame.id === undefined ? undefined : this.byWireId.get(frame.id);
    if (frame.type === 'error') {
      if (sub) sub.refused(frame);
      else console.warn('stream error', frame.code, frame.message);
      return;
    }
    if (sub && frame.type !== 'unsubscribed') sub.receive(frame);
  }
}

/** One subscription; survives reconnects (it is sent again on each connection). */
class Subscription {
  constructor(client, key, request, handler) {
    this.client = client;
    this.key = key;
    this.request = request;
    this.handler = handler;
    this.wireId = null;
    this.generation = 0;
    this.lastSeq = 0;
    this.active = true;
    this.retryTimer = null;
  }

  /** Send the subscribe frame under a fresh id (ids must be unique per connection). */
  send() {
    if (!this.active) return;
    this.generation += 1;
    this.wireId = `${this.key}.${this.generation}`;
    this.lastSeq = 0;
    this.client.byWireId.set(this.wireId, this);
    this.client.send({ op: 'subscribe', id: this.wireId, ...this.request });
  }

  /** Drop the current server-side subscription and subscribe again (fresh snapshot). */
  renew() {
    this.dropWireId();
    this.send();
  }

  dropWireId() {
    if (this.wireId === null) return;
    this.client.byWireId.delete(this.wireId);
    this.client.send({ op: 'unsubscribe', id: this.wireId });
    this.wireId = null;
  }

  receive(frame) {
    const expected = this.lastSeq + 1;
    // seq continues after a server-side re-snapshot (its hub reconnected to Redis)
    if (frame.seq !== expected && !(frame.type === 'snapshot' && frame.seq > this.lastSeq)) {
      console.warn(`stream: ${this.wireId} seq ${frame.seq} after ${this.lastSeq}; resubscribing`);
      this.renew();
      return;
    }
    this.lastSeq = frame.seq;
    this.handler.onFrame(frame);
  }

  refused(frame) {
    if (frame.code === 'unavailable') {
      this.client.byWireId.delete(this.wireId);
      this.wireId = null;
      clearTimeout(this.retryTimer);
      // a reconnect meanwhile has sent it again already (wireId set)
      this.retryTimer = setTimeout(() => {
        if (this.wireId === null && this.client.isOpen()) this.send();
      }, RETRY_UNAVAILABLE_MS);
    }
    if (this.handler.onError) this.handler.onError(frame);
  }

  /** Unsubscribe (idempotent). */
  close() {
    if (!this.active) return;
    this.active = false;
    clearTimeout(this.retryTimer);
    this.dropWireId();
    this.client.subs.delete(this.key);
  }
}
