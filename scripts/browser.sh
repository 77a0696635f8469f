#!/usr/bin/env bash
# Installs Debian's chromium (for the browser tests, tests/integration/test_chart_browser.py)
# when /usr/bin/chromium is missing. Idempotent; uses sudo only when not root.
set -euo pipefail
if [[ -x /usr/bin/chromium ]]; then
  echo "browser: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) present"
  exit 0
fi
SUDO=()
[[ $(id -u) -eq 0 ]] || SUDO=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium
echo "browser: installed $(/usr/bin/chromium --version)"
