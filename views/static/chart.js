// The chart page (GET /): candlesticks and volume of one series, live over /stream.
//
// History comes from GET /ohlcv (first load, ending at "now") and GET /udf/history
// (older pages while the user scrolls back, countback paging that skips gaps); live
// bars, the latest price and the replay state come over the WebSocket (stream.js).
// "Now" is the replay clock while a replay runs (a replay of 2024 shows 2024 candles),
// else the newest trade of the series, else the wall clock.
//
// Page URL parameters: ?symbol=&exchange=&interval= (initial series; exchange empty =
// consolidated) and ?token= (bearer token for the API and the stream).
import {
  CandlestickSeries,
  HistogramSeries,
  createChart,
} from '/static/vendor/lightweight-charts.standalone.production.mjs';
import { StreamClient } from '/static/stream.js';

const INTERVAL_MS = { '1m': 60e3, '5m': 300e3, '15m': 900e3, '30m': 1800e3,
                      '1h': 3600e3, '4h': 14400e3, '1d': 86400e3 };
const RESOLUTION = { '1m': '1', '5m': '5', '15m': '15', '30m': '30', '1h': '60',
                     '4h': '240', '1d': '1D' };
const PAGE_BARS = 300; // bars per history request
const LEFT_EDGE_BARS = 20; // load older history when fewer bars than this are left of view
const HEALTH_POLL_MS = 5000;
const UP = 'rgba(38, 166, 154, 0.5)';
const DOWN = 'rgba(239, 83, 80, 0.5)';

const params = new URLSearchParams(location.search);
const token = params.get('token');
const $ = (id) => document.getElementById(id);

// ---- HTTP ---------------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, body) {
    super(body?.error?.message || body?.errmsg || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

/** fetch() JSON from the worker; throws HttpError (status >= 400) or TypeError (offline). */
async function api(path, { method = 'GET', allow = [] } = {}) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const resp = await fetch(path, { method, headers, cache: 'no-store' });
  const body = await resp.json().catch(() => null);
  if (!resp.ok && !allow.includes(resp.status)) throw new HttpError(resp.status, body);
  return { status: resp.status, body };
}

const query = (obj) => new URLSearchParams(
  Object.entries(obj).filter(([, v]) => v !== null && v !== undefined && v !== '')).toString();

// ---- banner: one line per problem source ----------------------------------------------

const problems = new Map();

function setProblem(source, message) {
  if (message) problems.set(source, message);
  else problems.delete(source);
  const banner = $('banner');
  banner.textContent = [...problems.values()].join('\n');
  banner.hidden = problems.size === 0;
}

// ---- state --------------------------------------------------------------------------

const state = {
  symbol: params.get('symbol') || '',
  exchange: params.get('exchange') || '', // '' = consolidated across exchanges
  interval: INTERVAL_MS[params.get('interval')] ? params.get('interval') : '1m',
  nowMs: null, // the "now" the current history was loaded for
  lastFrameMs: null, // wall clock of the last bar frame applied to the chart
  loading: false,
  loads: 0, // completed (re)loads of the series, for tests
  exhausted: false, // no older history to page in
};
let pairs = []; // [{symbol, exchange}] from /udf/search
let loadGeneration = 0; // a newer load makes older responses stale
let barsSub = null;
let pricesSub = null;
let lastPrice = null;
const candles = new Map(); // bucket start (s) -> {time, open, high, low, close, volume}

// ---- the chart ----------------------------------------------------------------------

const chart = createChart($('chart'), {
  autoSize: true,
  layout: { background: { color: '#131722' }, textColor: '#d1d4dc', attributionLogo: true },
  grid: { vertLines: { color: '#1f2430' }, horzLines: { color: '#1f2430' } },
  timeScale: { timeVisible: true, secondsVisible: false, maxBarSpacing: 30, rightOffset: 3 },
});
const candleSeries = chart.addSeries(CandlestickSeries, {});
const volumeSeries = chart.addSeries(HistogramSeries, {
  priceScaleId: 'volume', priceFormat: { type: 'volume' }, lastValueVisible: false,
});
// volume in the bottom fifth, on its own scale
chart.priceScale('volume').applyOptions({ scaleMargins: { top: 0.8, bottom: 0 } });

const candleOf = (bar) => ({
  time: Math.floor(bar.bucket_start_ms / 1000), open: bar.open, high: bar.high,
  low: bar.low, close: bar.close, volume: parseFloat(bar.volume), // exact decimal string
});
const volumeOf = (c) => ({ time: c.time, value: c.volume, color: c.close >= c.open ? UP : DOWN });
const ohlcOf = ({ time, open, high, low, close }) => ({ time, open, high, low, close });

/** Draw every candle again (after a load, a prepend or an insertion in the middle). */
function redraw() {
  const sorted = [...candles.values()].sort((a, b) => a.time - b.time);
  candleSeries.setData(sorted.map(ohlcOf));
  volumeSeries.setData(sorted.map(volumeOf));
}

/** Apply one bar of a frame: update it in place when possible, else redraw. */
function upsert(bar) {
  const c = candleOf(bar);
  const data = candleSeries.data();
  const last = data.length ? data[data.length - 1].time : -Infinity;
  if (data.length && c.time < data[0].time) return; // older than loaded: paging brings it
  const known = candles.has(c.time);
  candles.set(c.time, c);
  if (c.time >= last || known) {
    const historical = c.time < last; // an existing older bar (a correction)
    candleSeries.update(ohlcOf(c), historical);
    volumeSeries.update(volumeOf(c), historical);
  } else {
    redraw(); // a bucket missing in the middle
  }
}

// ---- history --------------------------------------------------------------------------

const pairTicker = (symbol, exchange) => (exchange ? `${exchange}:${symbol}` : symbol);

/** The "now" of a series: replay clock, else its newest trade, else the wall clock. */
async function resolveNowMs() {
  const clock = replayClockMs();
  if (clock !== null) return clock;
  const path = state.exchange
    ? `/prices/latest/${encodeURIComponent(state.exchange)}/${encodeURIComponent(state.symbol)}`
    : `/prices/latest/${encodeURIComponent(state.symbol)}`;
  try {
    const { body } = await api(path);
    return body.timestamp ?? body.ts_ms ?? Date.now();
  } catch {
    return Date.now();
  }
}

async function fetchOhlcv(startMs, endMs) {
  const q = query({ symbol: state.symbol, exchange: state.exchange, interval: state.interval,
                    start: Math.floor(startMs), end: Math.floor(endMs) });
  const { status, body } = await api(`/ohlcv?${q}`, { allow: [404] });
  return status === 404 ? [] : body.bars;
}

/** Load the series from scratch: history ending at "now", then the live subscription. */
async function loadSeries() {
  const generation = ++loadGeneration;
  if (barsSub) barsSub.close();
  barsSub = null;
  if (!state.symbol) { // nothing stored yet: no pair to pick, nothing to ask for
    setProblem('history', 'No bars stored yet: reload once data flows.');
    return;
  }
  state.loading = true;
  state.exhausted = false;
  subscribePrices();
  try {
    const iv = INTERVAL_MS[state.interval];
    const nowMs = await resolveNowMs();
    const endMs = Math.floor(nowMs / iv) * iv + iv; // through the open bucket
    const bars = await fetchOhlcv(endMs - PAGE_BARS * iv, endMs);
    if (generation !== loadGeneration) return;
    state.nowMs = nowMs;
    candles.clear();
    for (const b of bars) candles.set(candleOf(b).time, candleOf(b));
    redraw();
    // a short series is spread over the width (up to maxBarSpacing), a long one ends
    // at the right edge
    if (bars.length < 100) chart.timeScale().fitContent();
    else chart.timeScale().scrollToRealTime();
    applyPriceFormat(generation);
    setProblem('history', null);
  } catch (err) {
    if (generation === loadGeneration) setProblem('history', `History: ${err.message}`);
  } finally {
    if (generation === loadGeneration) {
      state.loading = false;
      state.loads += 1;
      subscribeBars(); // after the history, so its snapshot and updates win
      maybeLoadOlder(chart.timeScale().getVisibleLogicalRange());
    }
  }
}

/** Page older bars in (countback paging over /udf/history skips gaps, ends on no_data). */
async function loadOlder() {
  const data = candleSeries.data();
  if (state.loading || state.exhausted || !data.length) return;
  const generation = loadGeneration;
  state.loading = true;
  try {
    let to = data[0].time - 1;
    for (let jumps = 0; jumps < 5; jumps++) {
      const q = query({ symbol: pairTicker(state.symbol, state.exchange), from: 0, to,
                        resolution: RESOLUTION[state.interval], countback: PAGE_BARS });
      const { body } = await api(`/udf/history?${q}`, { allow: [404] });
      if (generation !== loadGeneration) return;
      if (body?.s === 'ok') {
        prepend(body);
        return;
      }
      if (!body?.nextTime) break;
      to = body.nextTime;
    }
    state.exhausted = true;
  } catch (err) {
    setProblem('history', `Older history: ${err.message}`);
  } finally {
    if (generation === loadGeneration) state.loading = false;
  }
}

function prepend(udf) {
  const range = chart.timeScale().getVisibleLogicalRange();
  const before = candles.size;
  udf.t.forEach((t, i) => {
    if (!candles.has(t)) {
      candles.set(t, { time: t, open: udf.o[i], high: udf.h[i], low: udf.l[i],
                       close: udf.c[i], volume: parseFloat(udf.v[i]) });
    }
  });
  redraw();
  // keep the view where it was: logical indexes shifted by the bars added on the left
  const added = candles.size - before;
  if (range) chart.timeScale().setVisibleLogicalRange({ from: range.from + added,
                                                        to: range.to + added });
}

function maybeLoadOlder(range) {
  if (range && range.from < LEFT_EDGE_BARS) loadOlder();
}
chart.timeScale().subscribeVisibleLogicalRangeChange(maybeLoadOlder);

async function applyPriceFormat(generation) {
  try {
    const { body } = await api(`/udf/symbols?${query({ symbol: pairTicker(state.symbol,
                                                                           state.exchange) })}`);
    if (generation !== loadGeneration || !body?.pricescale) return;
    const precision = Math.max(0, Math.round(Math.log10(body.pricescale)));
    candleSeries.applyOptions({ priceFormat: { type: 'price', precision,
                                               minMove: 1 / body.pricescale } });
  } catch {
    // the default format (2 decimals) is fine
  }
}

// ---- live: stream subscriptions ----------------------------------------------------------

const stream = new StreamClient({
  token,
  onStatus({ state: s, code, reason }) {
    if (s === 'closed') {
      const why = reason || (code === 1006 ? 'connection lost' : `code ${code}`);
      setProblem('stream', `Live stream disconnected (${why}); reconnecting…`);
    } else if (s === 'open') {
      setProblem('stream', null);
    }
  },
});

function subscribeBars() {
  if (!state.symbol) return;
  barsSub = stream.subscribe(
    { channel: 'bars', symbol: state.symbol, exchange: state.exchange || null,
      interval: state.interval },
    {
      onFrame(frame) {
        const bars = frame.type === 'snapshot' ? frame.bars : frame.bar ? [frame.bar] : [];
        for (const bar of bars) upsert(bar);
        if (bars.length) state.lastFrameMs = Date.now();
      },
      onError(frame) {
        setProblem('bars', `Live bars: ${frame.code}: ${frame.message}`);
      },
    },
  );
}

function subscribePrices() {
  if (pricesSub) pricesSub.close();
  lastPrice = null;
  renderTicker(null);
  if (!state.symbol) return;
  pricesSub = stream.subscribe(
    { channel: 'prices', symbols: [pairTicker(state.symbol, state.exchange)] },
    {
      onFrame(frame) {
        const prices = frame.type === 'snapshot' ? frame.prices : [frame.price];
        for (const p of prices) renderTicker(p);
      },
    },
  );
}

function renderTicker(p) {
  const el = $('ticker');
  if (!p) {
    el.textContent = '–';
    return;
  }
  el.className = `ticker ${lastPrice !== null && p.price < lastPrice ? 'down' : 'up'}`;
  lastPrice = p.price;
  const when = new Date(p.ts_ms).toISOString().slice(11, 19);
  el.textContent = `${p.symbol} ${p.price} · ${p.exchange} · ${when} UTC`;
}

// ---- replay panel ---------------------------------------------------------------------

let replay = null; // the newest replay state (/replay/status body) or null
let replayAt = 0; // wall clock when it arrived
const replayActive = () => replay !== null && ['running', 'paused'].includes(replay.state);

/** The simulated clock now: the last state's clock moved on at its speed. */
function replayClockMs() {
  if (!replayActive()) return null;
  if (replay.state !== 'running' || !(replay.speed > 0)) return replay.clock_ms;
  // at most 2 s of extrapolation: the server sends the clock several times a second
  const elapsed = Math.min(Date.now() - replayAt, 2000);
  return replay.clock_ms + elapsed * replay.speed;
}

let replaySeen = false; // the first replay frame describes the replay the page loaded in

function onReplay(next) {
  const predicted = replayClockMs();
  const prev = replay;
  const first = !replaySeen;
  replaySeen = true;
  replay = next;
  replayAt = Date.now();
  renderReplay();
  if (!replayActive() || first) return;
  // A new session or a seek moves the chart's "now": reload the history there. A seek
  // is a command, so the state's `ack` (last command applied) changed with the jump.
  const newSession = prev?.session !== next.session;
  const jump = prev !== null && prev.ack !== next.ack && predicted !== null
    && Math.abs(next.clock_ms - predicted) > 2 * INTERVAL_MS[state.interval];
  if (newSession || jump) loadSeries();
}

stream.subscribe({ channel: 'replay' }, {
  onFrame: (frame) => onReplay(frame.replay ?? null),
});

const fmtClock = (ms) => new Date(ms).toISOString().slice(0, 19).replace('T', ' ') + ' UTC';

function renderReplay() {
  $('replay-panel').hidden = !replayActive();
  if (!replayActive()) return;
  $('replay-state').textContent = replay.state;
  $('replay-pause').disabled = replay.state !== 'running';
  $('replay-resume').disabled = replay.state !== 'paused';
  $('replay-progress').textContent = `${replay.position} / ${replay.total}`;
  $('replay-progress-bar').max = replay.total || 1;
  $('replay-progress-bar').value = replay.position || 0;
  if (document.activeElement !== $('replay-speed-input')) {
    $('replay-speed-input').value = replay.speed;
  }
  if (!$('replay-seek-input').value) {
    $('replay-seek-input').value = new Date(replay.clock_ms).toISOString().slice(0, 19);
  }
}

function tickReplayClock() {
  const clock = replayClockMs();
  const text = clock === null ? '–' : fmtClock(clock);
  if ($('replay-clock').textContent !== text) $('replay-clock').textContent = text;
}
setInterval(tickReplayClock, 250);

async function replayCommand(path) {
  $('replay-message').textContent = '…';
  try {
    const { status, body } = await api(path, { method: 'POST' });
    $('replay-message').textContent = status === 202 ? 'sent (not applied yet)' : '';
    if (body?.state) onReplay(body);
  } catch (err) {
    $('replay-message').textContent = err.message;
  }
}

$('replay-pause').onclick = () => replayCommand('/replay/pause');
$('replay-resume').onclick = () => replayCommand('/replay/resume');
$('replay-stop').onclick = () => replayCommand('/replay/stop');
$('replay-speed').onclick = () => replayCommand(
  `/replay/speed?${query({ x: $('replay-speed-input').value })}`);
$('replay-seek').onclick = () => {
  const value = $('replay-seek-input').value; // datetime-local, read as UTC
  if (!value) return;
  const iso = new Date(`${value}Z`).toISOString();
  replayCommand(`/replay/seek?${query({ to: iso })}`);
};

// ---- health badge ---------------------------------------------------------------------

async function pollHealth() {
  const badge = $('health');
  try {
    const { body } = await api('/health', { allow: [503] });
    const down = ['broker', 'database', 'redis'].filter((d) => body[d] !== 'up');
    badge.className = `health ${down.length ? 'degraded' : 'ok'}`;
    badge.textContent = down.length ? `degraded: ${down.join(', ')} down` : 'healthy';
    badge.title = JSON.stringify(body.details || {});
    setProblem('worker', null);
    setProblem('redis', body.redis === 'down'
      ? 'Redis is down: latest prices come from stored bars, live updates may stall.' : null);
    setProblem('database', body.database === 'down'
      ? 'The database is down: history cannot be loaded (live bars continue).' : null);
    setProblem('broker', body.broker === 'down'
      ? 'The Kafka broker is down: no new trades are processed.' : null);
  } catch (err) {
    badge.className = 'health down';
    badge.textContent = 'unreachable';
    const why = err instanceof HttpError ? err.message : 'no answer';
    setProblem('worker', `The worker at ${location.host} is unreachable (${why}); retrying.`);
  }
}

// ---- pickers ----------------------------------------------------------------------------

function fillSelect(select, options, value) {
  select.replaceChildren(...options.map(([v, label]) => new Option(label, v, false, v === value)));
  select.value = value;
}

function fillPickers() {
  const symbols = [...new Set(pairs.map((p) => p.symbol))].sort();
  if (!symbols.includes(state.symbol)) {
    state.symbol = symbols.includes('BTCUSDT') ? 'BTCUSDT' : (symbols[0] || state.symbol);
  }
  fillSelect($('symbol'), symbols.map((s) => [s, s]), state.symbol);
  const exchanges = pairs.filter((p) => p.symbol === state.symbol).map((p) => p.exchange).sort();
  if (!exchanges.includes(state.exchange)) state.exchange = '';
  fillSelect($('exchange'), [['', 'all exchanges (consolidated)'],
                             ...exchanges.map((e) => [e, e])], state.exchange);
  $('interval').value = state.interval;
}

function rememberInUrl() {
  const q = new URLSearchParams(location.search);
  for (const key of ['symbol', 'exchange', 'interval']) q.set(key, state[key]);
  history.replaceState(null, '', `${location.pathname}?${q}`);
}

function onPick() {
  state.symbol = $('symbol').value;
  state.exchange = $('exchange').value;
  state.interval = $('interval').value;
  fillPickers();
  rememberInUrl();
  loadSeries();
}

for (const id of ['symbol', 'exchange', 'interval']) $(id).addEventListener('change', onPick);

async function loadPairs() {
  try {
    const { body } = await api(`/udf/search?${query({ query: '', limit: 100 })}`);
    pairs = body.map(({ symbol, exchange }) => ({ symbol, exchange }));
    setProblem('pairs', null);
  } catch (err) {
    setProblem('pairs', `Symbols: ${err.message}`);
  }
  fillPickers();
}

// ---- test hook and start ------------------------------------------------------------------

window.marketflowChart = Object.freeze({
  /** Candles currently in the series, oldest first ({time (s), open, high, low, close}). */
  bars: () => candleSeries.data().map(ohlcOf),
  /** Volume bars currently in the series ({time (s), value, color}). */
  volumes: () => volumeSeries.data().map(({ time, value }) => ({ time, value })),
  state: () => ({
    symbol: state.symbol, exchange: state.exchange || null, interval: state.interval,
    // the chart's "now": the replay clock while a replay runs, else the last load's
    nowMs: replayClockMs() ?? state.nowMs, loadedNowMs: state.nowMs,
    lastFrameMs: state.lastFrameMs, loading: state.loading, loads: state.loads,
    replay: replay && { ...replay, clockMs: replayClockMs() },
  }),
});

pollHealth();
setInterval(pollHealth, HEALTH_POLL_MS);
await loadPairs();
await loadSeries();
