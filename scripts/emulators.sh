#!/usr/bin/env bash
# Three marketflow exchange emulators on 127.0.0.1:40101-40103 (exchange1..3), the
# default live-mode inputs, for trying live mode without the provided exchange programs.
#   scripts/emulators.sh up [--rate 5 ...extra emulator options]  |  down  |  status
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
RUN=var/run
LOG=var/log
mkdir -p "$RUN" "$LOG"
cmd=${1:-status}
shift || true
for i in 1 2 3; do
  name=exchange$i port=$((40100 + i)) pidf=$RUN/emulator-$name.pid
  alive=false
  if [[ -s $pidf ]] && kill -0 "$(cat "$pidf")" 2>/dev/null; then alive=true; fi
  case $cmd in
    up)
      if $alive; then echo "$name: already running on 127.0.0.1:$port"; continue; fi
      .venv/bin/python -m feeds.emulator --name "$name" --port "$port" "$@" \
        >"$LOG/emulator-$name.log" 2>&1 &
      echo $! >"$pidf"
      for _ in $(seq 50); do
        grep -q listening "$LOG/emulator-$name.log" 2>/dev/null && break
        sleep 0.1
      done
      grep -q listening "$LOG/emulator-$name.log" || { echo "$name: failed, see $LOG/emulator-$name.log" >&2; exit 1; }
      echo "$name: listening on 127.0.0.1:$port"
      ;;
    down)
      if $alive; then kill "$(cat "$pidf")"; echo "$name: stopped"; else echo "$name: not running"; fi
      rm -f "$pidf"
      ;;
    status)
      if $alive; then echo "$name: up (127.0.0.1:$port)"; else echo "$name: down"; fi
      ;;
    *) echo "usage: $0 up [emulator options]|down|status" >&2; exit 2 ;;
  esac
done
