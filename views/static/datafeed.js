// MarketflowDatafeed: a TradingView Charting Library datafeed for marketflow.
//
// Implements the library's JS "Datafeed API", interface IBasicDataFeed
// (IDatafeedChartApi + IExternalDatafeed):
//   https://www.tradingview.com/charting-library-docs/latest/connecting_data/Datafeed-API/
//   https://www.tradingview.com/charting-library-docs/latest/api/interfaces/Charting_Library.IDatafeedChartApi/
// History and symbols come from the worker's UDF endpoints (views/udf.py, docs/api.md),
// live bars from the WebSocket stream (/stream, docs/stream.md, via stream.js):
//
//   onReady          GET /udf/config     (callback called asynchronously, as required)
//   searchSymbols    GET /udf/search
//   resolveSymbol    GET /udf/symbols?symbol=   ("exchange:SYMBOL", or "SYMBOL" consolidated)
//   getBars          GET /udf/history?from=&to=&countback=
//   subscribeBars    /stream bars subscription; unsubscribeBars ends it
//   getServerTime    GET /udf/time (the replay clock while a replay runs)
//
// Units: bar `time` is Unix milliseconds (as the library expects); `nextTime` of a
// no-data answer is passed on in Unix seconds, as the library's UDFCompatibleDatafeed
// does. The library's `periodParams.to` is exclusive and UDF's `to` is inclusive, so
// `to - 1` is sent: paging back with `to` = the oldest bar's time never repeats it.
//
//   import { MarketflowDatafeed } from '/static/datafeed.js';
//   new TradingView.widget({ datafeed: new MarketflowDatafeed(), symbol: 'BTCUSDT', ... });
import { StreamClient, streamUrl } from '/static/stream.js';

/** Charting Library resolution -> /stream and /ohlcv interval. */
export const RESOLUTION_INTERVALS = Object.freeze({
  1: '1m', 5: '5m', 15: '15m', 30: '30m', 60: '1h', 240: '4h', '1D': '1d', D: '1d',
});

/** "exchange:SYMBOL" -> {exchange, symbol}; "SYMBOL" -> consolidated (exchange null). */
export function parseTicker(ticker) {
  const i = ticker.indexOf(':');
  return i < 0 ? { exchange: null, symbol: ticker }
    : { exchange: ticker.slice(0, i) || null, symbol: ticker.slice(i + 1) };
}

// volumes are exact decimal strings on the wire; the library wants numbers
const barOf = (b) => ({ time: b.bucket_start_ms, open: b.open, high: b.high, low: b.low,
                        close: b.close, volume: parseFloat(b.volume) });

export class MarketflowDatafeed {
  /**
   * @param {object} [options]
   * @param {string} [options.baseUrl] the worker's origin (default: the page's)
   * @param {string} [options.token] bearer token for the API and the stream
   */
  constructor({ baseUrl = location.origin, token = null } = {}) {
    this.baseUrl = baseUrl;
    this.token = token;
    this.stream = null; // created on the first subscribeBars
    this.listeners = new Map(); // listenerGuid -> stream Subscription
  }

  async get(path, params = {}, { text = false } = {}) {
    const url = new URL(path, this.baseUrl);
    for (const [k, v] of Object.entries(params)) {
      if (v !== null && v !== undefined && v !== '') url.searchParams.set(k, v);
    }
    const headers = this.token ? { Authorization: `Bearer ${this.token}` } : {};
    const resp = await fetch(url, { headers, cache: 'no-store' });
    if (text) {
      if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
      return resp.text();
    }
    const body = await resp.json().catch(() => null);
    if (!resp.ok || body?.s === 'error') {
      throw new Error(body?.errmsg || body?.error?.message || `${path}: HTTP ${resp.status}`);
    }
    return body;
  }

  /** IExternalDatafeed.onReady: the DatafeedConfiguration, always asynchronously. */
  onReady(callback) {
    this.get('/udf/config').then(
      (config) => setTimeout(() => callback(config), 0),
      (err) => {
        console.warn('datafeed: /udf/config failed, using defaults', err.message);
        setTimeout(() => callback({ supported_resolutions: Object.keys(RESOLUTION_INTERVALS)
          .filter((r) => r !== 'D'), supports_search: true, supports_time: true }), 0);
      },
    );
  }

  /** IDatafeedChartApi.searchSymbols: SearchSymbolResultItem[]. */
  searchSymbols(userInput, exchange, symbolType, onResult) {
    this.get('/udf/search', { query: userInput, exchange, type: symbolType, limit: 30 })
      .then(onResult, (err) => {
        console.warn('datafeed: search failed', err.message);
        onResult([]);
      });
  }

  /** IDatafeedChartApi.resolveSymbol: LibrarySymbolInfo of "exchange:SYMBOL" or "SYMBOL". */
  resolveSymbol(symbolName, onResolve, onError, _extension) {
    this.get('/udf/symbols', { symbol: symbolName })
      .then((info) => setTimeout(() => onResolve(info), 0), (err) => onError(err.message));
  }

  /**
   * IDatafeedChartApi.getBars: bars with start in [from, to) (Unix seconds), or the
   * `countBack` newest before `to`; onResult(bars oldest first, {noData, nextTime}).
   */
  getBars(symbolInfo, resolution, periodParams, onResult, onError) {
    const { from, to, countBack } = periodParams;
    const params = { symbol: symbolInfo.ticker || symbolInfo.full_name || symbolInfo.name,
                     resolution, from: Math.max(0, Math.min(from, to - 1)), to: to - 1,
                     countback: countBack > 0 ? countBack : null };
    this.get('/udf/history', params).then((body) => {
      if (body.s === 'no_data') {
        const meta = { noData: true };
        if (body.nextTime !== undefined) meta.nextTime = body.nextTime;
        onResult([], meta);
        return;
      }
      const bars = body.t.map((t, i) => ({ time: t * 1000, open: body.o[i], high: body.h[i],
                                           low: body.l[i], close: body.c[i],
                                           volume: parseFloat(body.v[i]) }));
      onResult(bars, { noData: false });
    }, (err) => onError(err.message));
  }

  /**
   * IDatafeedChartApi.subscribeBars: live bars of the series over /stream. onTick gets
   * each changed bar {time (ms), open, high, low, close, volume}, never older than the
   * previous tick (the library appends or updates the newest bar only); a correction of
   * an older bar asks the library to reload its history instead.
   */
  subscribeBars(symbolInfo, resolution, onTick, listenerGuid, onResetCacheNeededCallback) {
    const interval = RESOLUTION_INTERVALS[resolution];
    if (!interval) {
      console.warn(`datafeed: no live bars for resolution ${resolution}`);
      return;
    }
    this.unsubscribeBars(listenerGuid);
    if (!this.stream) {
      this.stream = new StreamClient({ url: streamUrl(this.baseUrl), token: this.token });
    }
    const { exchange, symbol } = parseTicker(symbolInfo.ticker || symbolInfo.name);
    let newest = -Infinity;
    const sub = this.stream.subscribe({ channel: 'bars', symbol, exchange, interval }, {
      onFrame(frame) {
        const bars = frame.type === 'snapshot' ? frame.bars : frame.bar ? [frame.bar] : [];
        for (const b of bars) {
          if (b.bucket_start_ms >= newest) {
            newest = b.bucket_start_ms;
            onTick(barOf(b));
          } else if (b.correction && onResetCacheNeededCallback) {
            onResetCacheNeededCallback();
          }
        }
      },
      onError(frame) {
        console.warn(`datafeed: live bars of ${symbol}: ${frame.code}: ${frame.message}`);
      },
    });
    this.listeners.set(listenerGuid, sub);
  }

  /** IDatafeedChartApi.unsubscribeBars. */
  unsubscribeBars(listenerGuid) {
    const sub = this.listeners.get(listenerGuid);
    if (sub) sub.close();
    this.listeners.delete(listenerGuid);
  }

  /** IDatafeedChartApi.getServerTime: Unix seconds (the replay clock during a replay). */
  getServerTime(callback) {
    this.get('/udf/time', {}, { text: true }).then((t) => callback(Number(t)),
                                                  (err) => console.warn('datafeed:', err.message));
  }
}
