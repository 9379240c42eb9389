#!/usr/bin/env bash
# The test suite, runnable on a fresh Debian/Ubuntu machine that has only the Rust toolchain:
# installs what the tests need when it is missing, then runs `cargo nextest run --workspace`
# (extra arguments are passed on, e.g. `./test.sh -p broker --test store`).
#
# What the tests need besides Rust:
# - cargo-nextest: `cargo install --locked cargo-nextest` (as the current user).
# - PostgreSQL server binaries (`initdb`, `pg_ctl`, `postgres`), from which the presence-store
#   tests start throwaway clusters (testkit/src/pg.rs); not needed with
#   TEST_DATABASE_URL. Debian package `postgresql`.
# - Prometheus, for the dashboard test (device-sim/tests/dashboards.rs); not needed with
#   PROMETHEUS_BIN. Debian package `prometheus`.
# - Mosquitto, the TLS server of device-sim's TLS test (device-sim/tests/mosquitto_tls.rs), and
#   its mosquitto_passwd, which makes the password files of broker/tests/passwd.rs.
#   Debian package `mosquitto` (its binary is /usr/sbin/mosquitto, often not on a user's PATH).
# - mosquitto_pub and mosquitto_sub, real clients of the TLS listener (broker/tests/clients.rs).
#   Debian package `mosquitto-clients`.
# - Node.js and npm, and the MQTT.js client (broker/tests/js, `npm ci` there: the WebSocket
#   tests of broker/tests/clients.rs). Debian packages `nodejs` and `npm`.
# - Python 3, which runs the Eclipse Paho interoperability suite (broker/tests/paho.rs, from
#   ../shared/paho-interop beside the checkout). Debian package `python3`.
# Packages are installed with apt-get as root, or through sudo. When neither is possible the
# script stops and says what to install: the tests never skip a missing dependency silently.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

say() { echo "test.sh: $*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
  say "cargo not found: install the Rust toolchain (https://rustup.rs), version 1.89 or newer"
  exit 1
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest (cargo install --locked cargo-nextest)"
  cargo install --locked cargo-nextest
fi

have_postgres() {
  [[ -n "${TEST_DATABASE_URL:-}" ]] && return 0
  command -v initdb >/dev/null 2>&1 && return 0
  local bin
  for bin in /usr/lib/postgresql/*/bin/initdb; do
    [[ -x "$bin" ]] && return 0
  done
  return 1
}

have_prometheus() {
  if [[ -n "${PROMETHEUS_BIN:-}" ]]; then
    [[ -x "$PROMETHEUS_BIN" ]] && return 0
    say "PROMETHEUS_BIN=$PROMETHEUS_BIN is not an executable file"
    exit 1
  fi
  command -v prometheus >/dev/null 2>&1
}

have_mosquitto() {
  command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]]
}

have_mosquitto_clients() {
  command -v mosquitto_pub >/dev/null 2>&1 && command -v mosquitto_sub >/dev/null 2>&1
}

have_python() {
  command -v python3 >/dev/null 2>&1
}

have_node() {
  command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1
}

packages=()
have_postgres || packages+=(postgresql)
have_prometheus || packages+=(prometheus)
have_mosquitto || packages+=(mosquitto)
have_mosquitto_clients || packages+=(mosquitto-clients)
have_node || packages+=(nodejs npm)
have_python || packages+=(python3)

if ((${#packages[@]})); then
  as_root=()
  if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
      as_root=(sudo)
    else
      as_root=(none)
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1 || [[ "${as_root[*]}" == none ]]; then
    say "missing: ${packages[*]}. This script installs packages with apt-get, as root or through"
    say "sudo, and can do neither here. Install them yourself, then run ./test.sh again:"
    for p in "${packages[@]}"; do
      case "$p" in
        postgresql)
          say "  - the PostgreSQL server binaries (initdb, pg_ctl, postgres): Debian/Ubuntu" \
            "package 'postgresql', or set TEST_DATABASE_URL=postgres://USER:PASSWORD@HOST:PORT/DB" \
            "(USER needs CREATEDB)"
          ;;
        prometheus)
          say "  - Prometheus: Debian/Ubuntu package 'prometheus', or set PROMETHEUS_BIN to a" \
            "prometheus binary"
          ;;
        mosquitto)
          say "  - Mosquitto: Debian/Ubuntu package 'mosquitto' (on the PATH or /usr/sbin/mosquitto)"
          ;;
        mosquitto-clients)
          say "  - mosquitto_pub and mosquitto_sub: Debian/Ubuntu package 'mosquitto-clients'"
          ;;
        python3)
          say "  - Python 3: Debian/Ubuntu package 'python3' (runs the Paho interoperability suite)"
          ;;
        nodejs | npm)
          say "  - $p: Debian/Ubuntu package '$p' (Node.js and npm, for the MQTT.js client)"
          ;;
      esac
    done
    exit 1
  fi
  say "installing Debian packages: ${packages[*]}"
  # The tests start their own servers on free ports; a packaged service that starts does no harm.
  ${as_root[@]+"${as_root[@]}"} apt-get update
  ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${packages[@]}"
  if ! have_postgres || ! have_prometheus || ! have_mosquitto || ! have_mosquitto_clients ||
    ! have_node || ! have_python; then
    say "apt-get installed ${packages[*]} but initdb, prometheus, mosquitto, mosquitto_pub," \
      "node, npm or python3 is still not found"
    exit 1
  fi
fi

# The MQTT.js client of the WebSocket tests, at the versions of its package-lock.json.
js=broker/tests/js
if [[ ! -d "$js/node_modules/mqtt" || "$js/package-lock.json" -nt "$js/node_modules/.package-lock.json" ]]; then
  say "installing the MQTT.js test client (npm ci in $js)"
  npm ci --prefix "$js" --no-audit --no-fund
fi

exec cargo nextest run --workspace "$@"
