#!/usr/bin/env bash
# Installs Debian's prometheus and prometheus-pushgateway for the integration test in tests/ops
# (`.ci/run` calls it best-effort; the test's fixture calls it when the binaries are missing).
# Exit 0: both binaries are on PATH. Otherwise the last line on stderr says why not, and the test
# skips with that reason.
set -euo pipefail

have() { command -v prometheus >/dev/null && command -v prometheus-pushgateway >/dev/null; }
have && exit 0
if [ "$EUID" != 0 ]; then
    echo "not root: cannot apt-get install prometheus prometheus-pushgateway" >&2
    exit 3
fi
if ! command -v apt-get >/dev/null; then
    echo "no apt-get: install Debian's prometheus and prometheus-pushgateway by hand" >&2
    exit 3
fi

# NOTE: the tests start their own servers on free loopback ports; the packages' system services
# would listen on 0.0.0.0:9090 and :9091. Where no policy-rc.d exists (Docker images ship one),
# put one in place that denies every start for the length of the install.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
pkgs=(prometheus prometheus-pushgateway)
# Stale package lists 404 on the mirror: update and try once more.
if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2; then
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2
fi
if ! have; then
    echo "apt-get installed ${pkgs[*]} but the binaries are not on PATH ($PATH)" >&2
    exit 4
fi
