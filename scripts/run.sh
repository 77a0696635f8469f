#!/usr/bin/env bash
# The default run: install and start everything, then the worker fed by the real sample.
#   1. .venv + services (Apache Kafka, TimescaleDB, Redis) on 127.0.0.1;
#   2. once per Kafka cluster (its data persists), the sample's historical trades at full
#      speed (so /ohlcv has
#      history at once: 2020-09-27 14:04-14:07 and 2024-08-08 23:54-08-09 00:05);
#   3. the four 2024-08-08 Binance files replayed in a loop at real speed, re-stamped to
#      now (live-looking prices on two exchanges and two pairs);
#   4. `faust -A app worker` in the foreground; the API listens on http://127.0.0.1:6066,
#      and the chart page is http://127.0.0.1:6066/ (printed once the worker is up).
# Ctrl-C stops the worker and the replay; `scripts/services.sh down` stops the services.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
scripts/bootstrap.sh
scripts/services.sh up
export PATH=$REPO/.venv/bin:$PATH
mkdir -p var/run var/log

marker=var/kafka/history-replayed.$(cat var/kafka/cluster.id)
if [[ ! -f $marker ]]; then
  echo "run: replaying the sample's history (full speed)"
  faust -A app replay --namespace "" data/sample/trades/*.csv
  touch "$marker"
fi

LIVE=(data/sample/trades/binance_*_2024-08-08T2354_trades.csv)
faust -A app replay --speed 1 --rebase-now --repeat --batch-span-ms 250 "${LIVE[@]}" \
  >var/log/replay-live.log 2>&1 &
replay_pid=$!
trap 'kill $replay_pid 2>/dev/null || true' EXIT
echo "run: live replay running (pid $replay_pid, log var/log/replay-live.log)"
echo "run: starting the worker; the chart: http://127.0.0.1:6066/  (live replayed sample)"
echo "run: try also:"
echo "  curl http://127.0.0.1:6066/prices/latest/BTCUSDT"
echo "  curl 'http://127.0.0.1:6066/ohlcv?symbol=BTCUSDT&exchange=binance-usdm&start=2024-08-08T23:50:00Z&end=2024-08-09T00:10:00Z'"
echo "  curl http://127.0.0.1:6066/health"
(sleep 8; echo "run: chart page: http://127.0.0.1:6066/  (WebSocket stream: ws://127.0.0.1:6066/stream)") &
faust -A app worker -l info
