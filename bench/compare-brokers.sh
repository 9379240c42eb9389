#!/usr/bin/env bash
# Behavioural comparison: Heartwire vs Mosquitto 2.x vs rumqttd 0.20, same probes, same run.
#
# Reproduces the protocol defects recorded in /work/shared/research/rumqttd-evaluation.md
# (keep-alive bypassed by outgoing traffic, wrong will on session takeover, one bad client id
# blocking every later CONNECT) with bench/rumqttd's `probe`, a black-box MQTT 3.1.1 client.
# Each broker is started fresh for every scenario (a scenario may leave a broker broken), on a
# free loopback port; the probe's result line is logged and its verdict goes into the table.
#
# Environment (all optional):
#   BROKERS="heartwire mosquitto rumqttd"   which brokers to probe, in order
#   SCENARIOS="keepalive-silent keepalive-while-receiving takeover-will duplicate-bad-id"
#   KEEP_WORK=1        keep the temporary directory with broker logs and probe output
#   HEARTWIRE_BIN=PATH use this broker binary instead of building target/release/broker
#
# Needs root only to install mosquitto (apt-get) when it is missing. All traffic stays
# on loopback; every wait is bounded and all started processes are stopped on exit.
set -euo pipefail

BROKERS="${BROKERS:-heartwire mosquitto rumqttd}"
SCENARIOS="${SCENARIOS:-keepalive-silent keepalive-while-receiving takeover-will duplicate-bad-id}"
BROKER_START_TIMEOUT=20   # seconds until a broker must accept TCP
PROBE_TIMEOUT=60          # outer bound per probe run (each scenario bounds itself well below)
STOP_TIMEOUT=10           # seconds a process gets to exit after a signal

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BENCH_TAG=compare
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

for b in $BROKERS; do
  case "$b" in heartwire|mosquitto|rumqttd) ;; *) die "unknown broker '$b' in BROKERS" ;; esac
done

# Probe arguments and the result a correct MQTT 3.1.1 broker gives, per scenario.
declare -A PROBE_ARGS=(
  [keepalive-silent]="keepalive-silent --keepalive 5 --max-wait 30"
  [keepalive-while-receiving]="keepalive-while-receiving --keepalive 5 --publish-every 2 --max-wait 30"
  [takeover-will]="takeover-will"
  [duplicate-bad-id]="duplicate-bad-id"
)
declare -A EXPECTED=(
  [keepalive-silent]="closed after 7.5 s"
  [keepalive-while-receiving]="closed after 7.5 s"
  [takeover-will]="A, then B"
  [duplicate-bad-id]="later connect ok"
)
for s in $SCENARIOS; do
  [[ -n "${PROBE_ARGS[$s]:-}" ]] || die "unknown scenario '$s' in SCENARIOS"
done

# --- processes started by this script, stopped on exit -------------------------------------
bench_setup compare-brokers

# --- helpers -------------------------------------------------------------------------------
# wait_tcp PORT PID NAME: bounded wait until 127.0.0.1:PORT accepts. Returns 1 if PID exits
# first (the caller retries: the free port may have been taken in the meantime), dies on timeout.
wait_tcp() {
  local port="$1" pid="$2" name="$3" i
  for (( i = 0; i < BROKER_START_TIMEOUT * 10; i++ )); do
    kill -0 "$pid" 2>/dev/null || return 1
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "$name did not accept TCP on port $port within ${BROKER_START_TIMEOUT}s"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- prerequisites -------------------------------------------------------------------------
command -v python3 >/dev/null || die "python3 is needed to pick free ports"
command -v timeout >/dev/null || die "timeout (coreutils) is needed"

MOSQUITTO=""
if [[ " $BROKERS " == *" mosquitto "* ]]; then
  find_mosquitto
  log "mosquitto: $("$MOSQUITTO" -h 2>/dev/null | head -n 1 || true)"
fi

if [[ " $BROKERS " == *" heartwire "* && -z "${HEARTWIRE_BIN:-}" ]]; then
  log "building broker (release)"
  cargo build --release --quiet -p broker
fi
if [[ " $BROKERS " == *" heartwire "* ]]; then
  heartwire_binary
fi

log "building bench/rumqttd (release; the first build takes a few minutes)"
cargo build --release --quiet --manifest-path bench/rumqttd/Cargo.toml
PROBE="$ROOT/bench/rumqttd/target/release/probe"
RUMQTTD="$ROOT/bench/rumqttd/target/release/rumqttd-broker"

# --- one broker instance per scenario --------------------------------------------------------
# start_broker NAME TAG -> sets BROKER_PID, BROKER_PORT, BROKER_LOG. A port reported free can be
# taken as the source port of some other outgoing loopback connection before the broker binds
# it (seen with other tests running), so a broker that exits during startup gets a few retries.
start_broker() {
  local name="$1" tag="$2" attempt
  for attempt in 1 2 3 4 5; do
    start_broker_once "$name" "$tag"
    if wait_tcp "$BROKER_PORT" "$BROKER_PID" "$name"; then return 0; fi
    wait "$BROKER_PID" 2>/dev/null || true
    log "$name exited during startup on port $BROKER_PORT (attempt $attempt): $(grep -m 1 -iE 'error|in use' "$BROKER_LOG" || tail -n 1 "$BROKER_LOG")"
    cp "$BROKER_LOG" "$BROKER_LOG.attempt$attempt"
  done
  die "$name failed to start 5 times (see $BROKER_LOG):
$(head -n 20 "$BROKER_LOG" 2>/dev/null)"
}

start_broker_once() {
  local name="$1" tag="$2"
  BROKER_PORT="$(free_port)"
  BROKER_LOG="$WORK/$tag.log"
  case "$name" in
    heartwire)
      mkdir -p "$WORK/$tag"
      (cd "$WORK/$tag" && \
        BROKER_MQTT__LISTEN="127.0.0.1:$BROKER_PORT" BROKER_HTTP__LISTEN="127.0.0.1:0" RUST_LOG=warn exec "$HEARTWIRE") \
        >"$BROKER_LOG" 2>&1 &
      ;;
    mosquitto)
      # "user" names the account mosquitto switches to when started as root; it refuses to
      # keep running as root unless that account is root. Without root the line is ignored.
      cat >"$WORK/$tag.conf" <<EOF
listener $BROKER_PORT 127.0.0.1
allow_anonymous true
persistence false
log_dest stderr
log_type error
log_type warning
user $(id -un)
EOF
      "$MOSQUITTO" -c "$WORK/$tag.conf" >"$BROKER_LOG" 2>&1 &
      ;;
    rumqttd)
      RUST_LOG=warn "$RUMQTTD" --listen "127.0.0.1:$BROKER_PORT" >"$BROKER_LOG" 2>&1 &
      ;;
  esac
  BROKER_PID=$!
  PIDS+=("$BROKER_PID")
}

# Table cells: the verdict (first key=value of the probe's line), shortened.
cell() {
  local line="$1" first
  first="${line%% *}"
  case "$first" in
    closed_after_s=*) printf 'closed after %s s' "${first#*=}" ;;
    not_closed_within_s=*) printf 'NOT closed in %s s' "${first#*=}" ;;
    will_on_takeover=*)
      local abrupt
      abrupt="$(tr ' ' '\n' <<<"$line" | awk -F= '$1 == "will_on_abrupt_close" { print $2 }')"
      printf '%s, then %s' "${first#*=}" "$abrupt" ;;
    later_connect=ok) printf 'later connect ok' ;;
    later_connect=failed*)
      local why="${first#later_connect=failed(}"
      why="${why%)}"
      case "$why" in
        closed_without_connack*) why="closed, no CONNACK" ;;
        no_connack_within*) why="no CONNACK" ;;
      esac
      printf 'later connect FAILED: %s' "$why" ;;
    *) printf '%s' "$first" ;;
  esac
}

declare -A RESULT
for s in $SCENARIOS; do
  for b in $BROKERS; do
    tag="$b-$s"
    start_broker "$b" "$tag"
    log "$s on $b (port $BROKER_PORT)"
    # shellcheck disable=SC2086  # PROBE_ARGS holds several words on purpose
    if line="$(timeout -k 5 "$PROBE_TIMEOUT" "$PROBE" --host 127.0.0.1 --port "$BROKER_PORT" \
        ${PROBE_ARGS[$s]} 2>"$WORK/$tag.probe.err")"; then
      log "  $line"
      RESULT["$s|$b"]="$(cell "$line")"
    else
      rc=$?
      log "  probe could not run (exit $rc): $(tail -n 1 "$WORK/$tag.probe.err")"
      RESULT["$s|$b"]="probe error ($rc)"
    fi
    kill -0 "$BROKER_PID" 2>/dev/null || log "  $b exited during the scenario (see $BROKER_LOG)"
    stop_pid "$BROKER_PID" TERM
  done
done

# --- report ---------------------------------------------------------------------------------
echo
echo "MQTT 3.1.1 behaviour (keep-alive 5 s; publisher every 2 s; wills: A = taken-over connection, B = new one)"
# Column widths: the longest cell or broker name of each column.
declare -A W
for b in $BROKERS; do
  W[$b]=${#b}
  for s in $SCENARIOS; do c="${RESULT["$s|$b"]}"; (( ${#c} > W[$b] )) && W[$b]=${#c}; done
done
header="$(printf '%-26s | %-18s' scenario "correct broker")"
for b in $BROKERS; do header+="$(printf ' | %-*s' "${W[$b]}" "$b")"; done
echo "$header"
echo "${header//[^|]/-}"
for s in $SCENARIOS; do
  row="$(printf '%-26s | %-18s' "$s" "${EXPECTED[$s]}")"
  for b in $BROKERS; do row+="$(printf ' | %-*s' "${W[$b]}" "${RESULT["$s|$b"]}")"; done
  echo "$row"
done
