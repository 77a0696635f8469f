#!/usr/bin/env bash
# The whole test suite on a fresh machine: .venv, services, lint, type-check, all tests
# (unit + integration against the real broker, TimescaleDB and Redis). .ci/run calls this.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
scripts/bootstrap.sh
scripts/browser.sh   # Debian's chromium for the browser tests (Playwright drives it)
scripts/promtool.sh  # Debian's promtool for the alert-rule tests and the /metrics lint
scripts/services.sh up
export PATH=$REPO/.venv/bin:$PATH
echo "== ruff"; ruff check .
echo "== mypy"; mypy
echo "== pytest"
set +e
pytest -q -p no:cacheprovider --durations=25 "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
