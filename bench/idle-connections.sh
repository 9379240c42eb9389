#!/usr/bin/env bash
# Benchmark: RSS per idle MQTT connection and idle CPU, Heartwire vs Mosquitto (and optionally
# rumqttd 0.20 from bench/rumqttd), same run.
#
# For each broker in turn: start it on a free port, wait until it accepts TCP, read its
# baseline RSS, connect COUNT idle devices with device-sim (keep-alive 30 s, spread over
# 127.0.0.1 and 127.0.0.2), wait for device-sim's ready file, let it settle, read the loaded
# RSS, measure the broker's CPU over an idle window, then stop everything. A table follows.
#
# Environment (all optional):
#   COUNT=10000        devices per broker
#   RATE=2000          device-sim connects per second
#   KEEPALIVE=30       MQTT keep-alive of the devices, seconds
#   SETTLE=5           seconds between "all connected" and the loaded RSS reading
#   IDLE_WINDOW=30     seconds of the idle CPU measurement
#   BROKERS="heartwire mosquitto"   which brokers to measure, in order; "rumqttd" adds
#                      rumqttd 0.20.0 (bench/rumqttd's rumqttd-broker, built on demand)
#   PUBLISH_INTERVAL=S every device also publishes a message every S seconds (device-sim
#                      --publish-interval): the CPU window then measures the cost of telemetry,
#                      reported as CPU % and CPU microseconds per message
#   QOS=0, PAYLOAD_SIZE=64   telemetry QoS and payload bytes (with PUBLISH_INTERVAL)
#   KEEP_WORK=1        keep the temporary directory with logs and configs
#   HEARTWIRE_BIN=PATH use this broker binary instead of building target/release/broker
# Any BROKER_* variables in the environment reach the Heartwire broker unchanged;
# the script itself sets BROKER_MQTT__LISTEN, BROKER_HTTP__LISTEN=127.0.0.1:0 and RUST_LOG=warn;
# the broker runs in a temporary directory, so its SQLite file and journal start empty.
#
# Needs root only to install mosquitto (apt-get) when it is missing. All traffic stays
# on loopback; every wait is bounded and all started processes are stopped on exit.
set -euo pipefail

COUNT="${COUNT:-10000}"
RATE="${RATE:-2000}"
KEEPALIVE="${KEEPALIVE:-30}"
SETTLE="${SETTLE:-5}"
IDLE_WINDOW="${IDLE_WINDOW:-30}"
BROKERS="${BROKERS:-heartwire mosquitto}"
PUBLISH_INTERVAL="${PUBLISH_INTERVAL:-}"
QOS="${QOS:-0}"
PAYLOAD_SIZE="${PAYLOAD_SIZE:-64}"
TELEMETRY=()
if [[ -n "$PUBLISH_INTERVAL" ]]; then
  TELEMETRY=(--publish-interval "$PUBLISH_INTERVAL" --qos "$QOS" --payload-size "$PAYLOAD_SIZE")
fi
HOSTS="127.0.0.1,127.0.0.2"
BROKER_START_TIMEOUT=20                  # seconds until a broker must accept TCP
READY_TIMEOUT=$(( COUNT / RATE + 60 ))   # seconds until all devices must be connected
SIM_DURATION=$(( READY_TIMEOUT + SETTLE + IDLE_WINDOW + 60 ))  # device-sim's own bound
STOP_TIMEOUT=30                          # seconds a process gets to exit after a signal

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BENCH_TAG=bench
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

for b in $BROKERS; do
  case "$b" in heartwire|mosquitto|rumqttd) ;; *) die "unknown broker '$b' in BROKERS" ;; esac
done
[[ "$COUNT" =~ ^[1-9][0-9]*$ ]] || die "COUNT must be a positive integer"

# --- processes started by this script, stopped on exit -------------------------------------
bench_setup idle-bench

# --- helpers -------------------------------------------------------------------------------
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# utime + stime in clock ticks (fields 14 and 15 of /proc/PID/stat; the command name in
# field 2 may contain spaces, so count from after its closing parenthesis).
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }

now_s() { date +%s.%N; }

# nap SECONDS: a sleep that a trapped INT/TERM interrupts at once (a foreground sleep
# would delay the trap until it ends).
nap() {
  sleep "$1" &
  local pid=$!
  PIDS+=("$pid")
  wait "$pid"
}

# wait_tcp PORT PID NAME: bounded wait until 127.0.0.1:PORT accepts, failing if PID dies.
wait_tcp() {
  local port="$1" pid="$2" name="$3" i
  for (( i = 0; i < BROKER_START_TIMEOUT * 10; i++ )); do
    kill -0 "$pid" 2>/dev/null || die "$name exited during startup (see $WORK/$name.log):
$(tail -n 20 "$WORK/$name.log" 2>/dev/null)"
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "$name did not accept TCP on port $port within ${BROKER_START_TIMEOUT}s"
}

# wait_ready FILE PID: bounded wait for device-sim's ready file, failing if device-sim dies.
wait_ready() {
  local file="$1" pid="$2" i
  for (( i = 0; i < READY_TIMEOUT * 10; i++ )); do
    [[ -f "$file" ]] && return 0
    kill -0 "$pid" 2>/dev/null || die "device-sim exited before all $COUNT devices connected:
$(tail -n 5 "$WORK/sim.log")"
    sleep 0.1
  done
  die "not all $COUNT devices connected within ${READY_TIMEOUT}s; last status: $(grep '^t=' "$WORK/sim.log" | tail -n 1)"
}

# field KEY LINE: value of KEY=VALUE in a space-separated line.
field() { tr ' ' '\n' <<<"$2" | awk -F= -v k="$1" '$1 == k { print $2 }'; }

free_ports() {
  python3 - <<'EOF'
import socket
socks = []
for _ in range(3):
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# --- prerequisites -------------------------------------------------------------------------
MOSQUITTO=""
if [[ " $BROKERS " == *" mosquitto "* ]]; then
  find_mosquitto
fi
command -v python3 >/dev/null || die "python3 is needed to pick free ports"

PACKAGES=(-p device-sim)
if [[ " $BROKERS " == *" heartwire "* && -z "${HEARTWIRE_BIN:-}" ]]; then
  PACKAGES+=(-p broker)
fi
log "building ${PACKAGES[*]} (release)"
cargo build --release --quiet "${PACKAGES[@]}"
SIM="$ROOT/target/release/device-sim"
if [[ " $BROKERS " == *" heartwire "* ]]; then
  heartwire_binary
fi
RUMQTTD="$ROOT/bench/rumqttd/target/release/rumqttd-broker"
if [[ " $BROKERS " == *" rumqttd "* ]]; then
  log "building bench/rumqttd (release; the first build takes a few minutes)"
  cargo build --release --quiet --manifest-path bench/rumqttd/Cargo.toml --bin rumqttd-broker
fi

CLK_TCK="$(getconf CLK_TCK)"
# Children inherit the raised limit: each broker needs one descriptor per connection.
NOFILE_HARD="$(ulimit -Hn)"
[[ "$NOFILE_HARD" == unlimited ]] && NOFILE_HARD="$(cat /proc/sys/fs/nr_open)"
ulimit -n "$NOFILE_HARD"
(( COUNT + 64 <= $(ulimit -n) )) || die "COUNT=$COUNT exceeds the open-file limit $(ulimit -n)"

read -r PORT1 PORT2 PORT3 < <(free_ports) || true
[[ -n "${PORT1:-}" && -n "${PORT2:-}" && -n "${PORT3:-}" ]] || die "could not pick free ports"
log "ports: heartwire=$PORT1 mosquitto=$PORT2 rumqttd=$PORT3; count=$COUNT rate=$RATE keepalive=$KEEPALIVE"

# --- the procedure, once per broker ----------------------------------------------------------
declare -A RESULT

start_broker() {  # NAME -> sets BROKER_PID and BROKER_PORT
  local name="$1"
  case "$name" in
    heartwire)
      BROKER_PORT="$PORT1"
      mkdir -p "$WORK/heartwire"
      (cd "$WORK/heartwire" && \
        BROKER_MQTT__LISTEN="0.0.0.0:$PORT1" BROKER_AUTH__ALLOW_ANONYMOUS=true \
        BROKER_HTTP__LISTEN="127.0.0.1:0" RUST_LOG=warn exec "$HEARTWIRE") \
        >"$WORK/heartwire.log" 2>&1 &
      ;;
    mosquitto)
      BROKER_PORT="$PORT2"
      # "user" names the account mosquitto switches to when started as root; it refuses to
      # keep running as root unless that account is root. Without root the line is ignored.
      cat >"$WORK/mosquitto.conf" <<EOF
listener $PORT2 0.0.0.0
allow_anonymous true
max_keepalive 65535
persistence false
log_dest stderr
log_type error
log_type warning
user $(id -un)
EOF
      "$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
      ;;
    rumqttd)
      BROKER_PORT="$PORT3"
      RUST_LOG=warn "$RUMQTTD" --listen "0.0.0.0:$PORT3" >"$WORK/rumqttd.log" 2>&1 &
      ;;
  esac
  BROKER_PID=$!
  PIDS+=("$BROKER_PID")
}

measure() {
  local name="$1"
  log "== $name"
  start_broker "$name"
  wait_tcp "$BROKER_PORT" "$BROKER_PID" "$name"
  local rss_base
  rss_base="$(rss_kib "$BROKER_PID")"
  log "$name pid=$BROKER_PID port=$BROKER_PORT baseline RSS ${rss_base} KiB"

  local ready="$WORK/$name.ready"
  "$SIM" --host "$HOSTS" --port "$BROKER_PORT" --count "$COUNT" --rate "$RATE" \
    --keepalive "$KEEPALIVE" --duration "$SIM_DURATION" --prefix "bench-$name-" \
    --ready-file "$ready" "${TELEMETRY[@]}" >"$WORK/sim.log" 2>&1 &
  local sim_pid=$!
  PIDS+=("$sim_pid")
  wait_ready "$ready" "$sim_pid"
  log "all $COUNT devices connected ($(cat "$ready")); settling ${SETTLE}s"
  nap "$SETTLE"
  kill -0 "$BROKER_PID" 2>/dev/null || die "$name died under load (see $WORK/$name.log)"
  local rss_loaded
  rss_loaded="$(rss_kib "$BROKER_PID")"

  log "measuring CPU for ${IDLE_WINDOW}s"
  local t0 c0 t1 c1 m0 m1
  m0="$(field published "$(grep '^t=' "$WORK/sim.log" | tail -n 1 || true)")"
  t0="$(now_s)"; c0="$(cpu_ticks "$BROKER_PID")"
  nap "$IDLE_WINDOW"
  t1="$(now_s)"; c1="$(cpu_ticks "$BROKER_PID")"
  kill -0 "$BROKER_PID" 2>/dev/null || die "$name died during the idle window"
  local status connected
  status="$(grep '^t=' "$WORK/sim.log" | tail -n 1 || true)"
  connected="$(field connected "$status")"
  m1="$(field published "$status")"

  stop_pid "$sim_pid" INT
  local summary p50 p99
  summary="$(grep '^summary ' "$WORK/sim.log" | tail -n 1 || true)"
  [[ -n "$summary" ]] || die "device-sim printed no summary (see $WORK/sim.log)"
  p50="$(field connack_p50_ms "$summary")"
  p99="$(field connack_p99_ms "$summary")"
  cp "$WORK/sim.log" "$WORK/sim-$name.log"
  stop_pid "$BROKER_PID" TERM

  local per_conn cpu
  per_conn="$(awk -v a="$rss_loaded" -v b="$rss_base" -v n="$COUNT" 'BEGIN { printf "%.2f", (a - b) / n }')"
  cpu="$(awk -v c0="$c0" -v c1="$c1" -v t0="$t0" -v t1="$t1" -v hz="$CLK_TCK" \
    'BEGIN { printf "%.2f", (c1 - c0) / hz / (t1 - t0) * 100 }')"
  # Messages published during the window (device-sim's status lines, one per second) and the
  # broker's CPU time per message.
  local rate="-" per_msg="-"
  if [[ -n "$PUBLISH_INTERVAL" && -n "$m0" && -n "$m1" && "$m1" -gt "$m0" ]]; then
    rate="$(awk -v a="$m0" -v b="$m1" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.0f", (b - a) / (t1 - t0) }')"
    per_msg="$(awk -v c0="$c0" -v c1="$c1" -v hz="$CLK_TCK" -v a="$m0" -v b="$m1" \
      'BEGIN { printf "%.1f", (c1 - c0) / hz * 1e6 / (b - a) }')"
  fi
  log "$name: loaded RSS ${rss_loaded} KiB, ${per_conn} KiB/conn, CPU ${cpu}%, messages/s ${rate}, connected at end of window ${connected}"
  RESULT["$name"]="$name|$connected|$rss_base|$rss_loaded|$per_conn|$cpu|$p50|$p99|$rate|$per_msg"
}

for b in $BROKERS; do measure "$b"; done

# --- report ---------------------------------------------------------------------------------
echo
if [[ -n "$PUBLISH_INTERVAL" ]]; then
  echo "Connections with telemetry: COUNT=$COUNT keepalive=${KEEPALIVE}s, a ${PAYLOAD_SIZE}-byte QoS $QOS message every ${PUBLISH_INTERVAL}s per device, settle=${SETTLE}s, window=${IDLE_WINDOW}s ($(nproc) cores)"
else
  echo "Idle connections: COUNT=$COUNT keepalive=${KEEPALIVE}s settle=${SETTLE}s idle window=${IDLE_WINDOW}s ($(nproc) cores)"
fi
fmt='%-10s | %11s | %16s | %14s | %19s | %7s | %15s | %15s | %10s | %14s\n'
# shellcheck disable=SC2059
printf "$fmt" broker connections "RSS baseline KiB" "RSS loaded KiB" "KiB per connection" \
  "CPU %" "connack p50 ms" "connack p99 ms" "messages/s" "CPU µs per msg"
for b in $BROKERS; do
  IFS='|' read -r n c rb rl pc cpu p50 p99 rate per_msg <<<"${RESULT[$b]}"
  # shellcheck disable=SC2059
  printf "$fmt" "$n" "$c" "$rb" "$rl" "$pc" "$cpu" "$p50" "$p99" "$rate" "$per_msg"
done
