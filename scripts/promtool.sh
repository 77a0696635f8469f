#!/usr/bin/env bash
# Installs Debian's prometheus package for its promtool (rule unit tests and metric lint,
# tests/integration/test_observability.py) when /usr/bin/promtool is missing. Idempotent;
# uses sudo only when not root.
#
# Only promtool is wanted: the package's Prometheus server must not run or bind :9090.
# While installing, a policy-rc.d that denies every service start is put in place (unless
# one exists already, as in Docker images); afterwards the service is stopped and disabled
# in case a start got through anyway (systemd or sysvinit, whichever the machine uses).
set -euo pipefail
if [[ -x /usr/bin/promtool ]]; then
  echo "promtool: $(/usr/bin/promtool --version 2>&1 | head -n1) present"
  exit 0
fi
SUDO=()
[[ $(id -u) -eq 0 ]] || SUDO=(sudo)
export DEBIAN_FRONTEND=noninteractive
POLICY=/usr/sbin/policy-rc.d
if [[ ! -e $POLICY ]]; then
  printf '#!/bin/sh\n# scripts/promtool.sh: no service starts while installing\nexit 101\n' \
    | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod 755 "$POLICY"
  trap '"${SUDO[@]}" rm -f "$POLICY"' EXIT
fi
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends prometheus
# never at boot (systemctl disable also works without a running systemd, and updates the
# SysV links), and not now
if command -v systemctl >/dev/null; then
  "${SUDO[@]}" systemctl disable prometheus.service
elif [[ -x /etc/init.d/prometheus ]] && command -v update-rc.d >/dev/null; then
  "${SUDO[@]}" update-rc.d prometheus disable >/dev/null
fi
if [[ -d /run/systemd/system ]]; then
  "${SUDO[@]}" systemctl stop prometheus.service || true   # checked just below
elif [[ -x /etc/init.d/prometheus ]]; then
  "${SUDO[@]}" /etc/init.d/prometheus stop >/dev/null || true   # checked just below
fi
if pidof /usr/bin/prometheus >/dev/null; then
  echo "promtool: the prometheus package left its server running (pid $(pidof /usr/bin/prometheus)); stop it" >&2
  exit 1
fi
echo "promtool: installed $(/usr/bin/promtool --version 2>&1 | head -n1)"
