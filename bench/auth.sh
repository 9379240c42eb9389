#!/usr/bin/env bash
# Benchmark: authentication with password files, Heartwire vs Mosquitto, same run, same file,
# same load generator (bench/loadgen connect-rate).
#
# Once per run: DEVICES accounts dev-0 ... dev-<DEVICES-1>, user name = client id, password
# derived from SEED (the scheme of device-sim's --password-seed: the first 24 hex digits of
# SHA-256(seed || client id)), printed by `loadgen provision` and hashed by Debian's
# `mosquitto_passwd -U` into ONE password file of `$7$` lines (PBKDF2-SHA512, Mosquitto's 101
# iterations) that both brokers read: Mosquitto through `password_file` (allow_anonymous
# false), Heartwire through BROKER_AUTH__PASSWORD_FILE (its defaults otherwise: credential
# cache of 100,000, refusals in a row delayed up to 10 s). Then RUNS times, each broker in turn:
#   1. reconnect storm (a broker started afresh): DEVICES devices connect at STORM_RATE per
#      second, each with its own user name and password, and stay connected until the last
#      is answered; all disconnect; then all connect again at STORM_RATE (the storm: a broker
#      that remembers verified credentials hashes nothing now). CONNACK p50/p99/max, errors
#      and broker CPU per connect of both rounds;
#   2. wrong-password flood (a broker started afresh): LEGIT devices connect at LEGIT_RATE
#      alone (dev-0 ...); then LEGIT other devices (dev-LEGIT ...) at the same rate while FLOOD
#      CONNECTs for further accounts (dev-2*LEGIT ...) with wrong passwords arrive at
#      FLOOD_RATE from other source addresses (FLOOD_SOURCES). The legitimate devices' CONNACK
#      p99 alone and under the flood, and how the flood was answered.
# The devices of each measurement are new to the broker, so each hashes its passwords once
# (or, in the storm's second round, remembers them). A table of every run follows.
#
# Goals (issue 12): in the storm, Heartwire's CONNACK p99 at most Mosquitto's, zero errors;
# under the flood, the legitimate devices' p99 moves by at most 20 %.
#
# Environment (all optional):
#   DEVICES=15000        accounts in the password file, and devices of the storm (one loadgen
#                        process, one broker: each needs a descriptor per connection, under
#                        the open-file limit); at least 2 * LEGIT + FLOOD
#   STORM_RATE=5000      connects started per second in both storm rounds
#   LEGIT=5000           legitimate devices of each flood measurement
#   LEGIT_RATE=500       their connects per second (LEGIT / LEGIT_RATE seconds of connects)
#   FLOOD=5000           CONNECTs with wrong passwords during the second measurement
#   FLOOD_RATE=          their rate [default: FLOOD over the legitimate devices' time, so
#                        that the flood lasts as long as they connect]
#   SOURCES=127.0.0.2,127.0.0.3   source addresses of the legitimate devices (round-robin)
#   FLOOD_SOURCES=127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7   source addresses of the flood
#   ROUND_GAP=0          seconds between the storm's rounds (0: the devices reconnect as soon
#                        as they are gone, while the broker still processes their
#                        disconnects; more: the second round meets an idle broker)
#   RUNS=2               measurements of each kind per broker
#   SEED=heartwire-bench the password seed
#   CORES=1              1: broker pinned to core 0, loadgen to core 1 (taskset); 2: neither
#   NICE=0               niceness of the brokers and loadgen (e.g. -10, as root, on a machine
#                        shared with other work: the same for every broker)
#   BROKERS="heartwire mosquitto"   which brokers to measure, in order
#   KEEP_WORK=1          keep the temporary directory (password file, logs, JSON reports)
#   HEARTWIRE_BIN=PATH   use this broker binary instead of building target/release/broker
# Any BROKER_* variables in the environment reach the Heartwire broker unchanged (e.g.
# BROKER_AUTH__CREDENTIAL_CACHE_SIZE=0 to see the storm without the cache); the script sets
# BROKER_MQTT__LISTEN, BROKER_HTTP__LISTEN (both loopback, free ports),
# BROKER_AUTH__PASSWORD_FILE and RUST_LOG=warn; the broker runs in a temporary directory, so
# its SQLite file starts empty.
#
# Needs mosquitto_passwd (Debian's mosquitto package, installed with mosquitto when missing:
# root) and curl (Heartwire's /metrics, for the table's verification counts). All traffic stays
# on loopback (127.0.0.0/8); every wait is bounded and all started processes are stopped on
# exit.
set -euo pipefail

DEVICES="${DEVICES:-15000}"
STORM_RATE="${STORM_RATE:-5000}"
LEGIT="${LEGIT:-5000}"
LEGIT_RATE="${LEGIT_RATE:-500}"
FLOOD="${FLOOD:-5000}"
FLOOD_RATE="${FLOOD_RATE:-}"
SOURCES="${SOURCES:-127.0.0.2,127.0.0.3}"
FLOOD_SOURCES="${FLOOD_SOURCES:-127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7}"
RUNS="${RUNS:-2}"
ROUND_GAP="${ROUND_GAP:-0}"
NICE="${NICE:-0}"
SEED="${SEED:-heartwire-bench}"
CORES="${CORES:-1}"
BROKERS="${BROKERS:-heartwire mosquitto}"
KEEPALIVE=60
# Heartwire answers refusals in a row after up to 10 s (auth.failure_delay_max), so a CONNACK
# may take that long; loadgen waits longer before it counts a connect as failed.
STEP_TIMEOUT=20
BROKER_START_TIMEOUT=20   # seconds until a broker must accept TCP
STOP_TIMEOUT=30           # seconds a process gets to exit after a signal

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BENCH_TAG=auth
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
# shellcheck source=bench/brokers.sh
source "$ROOT/bench/brokers.sh"

for v in DEVICES STORM_RATE LEGIT LEGIT_RATE FLOOD RUNS ROUND_GAP; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number"
done
(( DEVICES > 0 && STORM_RATE > 0 && LEGIT > 0 && LEGIT_RATE > 0 && RUNS > 0 )) \
  || die "DEVICES, STORM_RATE, LEGIT, LEGIT_RATE and RUNS must be positive"
(( DEVICES >= 2 * LEGIT + FLOOD )) \
  || die "DEVICES=$DEVICES must be at least 2 * LEGIT + FLOOD = $(( 2 * LEGIT + FLOOD )): each measurement uses accounts of its own"
if [[ -z "$FLOOD_RATE" ]]; then
  FLOOD_RATE=$(( FLOOD * LEGIT_RATE / LEGIT ))
  (( FLOOD_RATE > 0 )) || FLOOD_RATE=1
fi
[[ "$FLOOD_RATE" =~ ^[0-9]+$ ]] || die "FLOOD_RATE must be a positive whole number"
(( FLOOD_RATE > 0 )) || die "FLOOD_RATE must be a positive whole number"
[[ "$SEED" =~ ^[A-Za-z0-9._-]+$ ]] || die "SEED must be letters, digits, '.', '_' or '-'"
[[ "$NICE" =~ ^-?[0-9]+$ ]] || die "NICE must be a whole number from -20 to 19"
(( NICE >= -20 && NICE <= 19 )) || die "NICE must be a whole number from -20 to 19"
(( NICE >= 0 || $(id -u) == 0 )) || die "NICE=$NICE: a negative niceness needs root"
command -v curl >/dev/null || die "curl is needed to read Heartwire's /metrics"
STORM_TIMEOUT=$(( DEVICES / STORM_RATE + STEP_TIMEOUT + 60 ))
FLOOD_TIMEOUT=$(( LEGIT / LEGIT_RATE + FLOOD / FLOOD_RATE + STEP_TIMEOUT + 60 ))

bench_setup auth-bench
loadgen_prerequisites
if (( NICE != 0 )); then
  BROKER_PIN=(nice -n "$NICE" ${BROKER_PIN[@]+"${BROKER_PIN[@]}"})
  LOADGEN_PIN=(nice -n "$NICE" ${LOADGEN_PIN[@]+"${LOADGEN_PIN[@]}"})
fi
(( DEVICES + 64 <= $(ulimit -n) )) || die "DEVICES=$DEVICES exceeds the open-file limit $(ulimit -n) of one loadgen process (and of each broker)"
(( LEGIT + FLOOD + 64 <= $(ulimit -n) )) || die "LEGIT + FLOOD exceeds the open-file limit $(ulimit -n)"
MOSQUITTO_PASSWD="$(command -v mosquitto_passwd || true)"
[[ -n "$MOSQUITTO_PASSWD" ]] || die "mosquitto_passwd is missing (Debian package mosquitto)"

# --- the password file ------------------------------------------------------------------------
PASSWORDS="$WORK/passwords"
"$LOADGEN" provision --client-prefix dev- --count "$DEVICES" --password-seed "$SEED" >"$PASSWORDS"
"$MOSQUITTO_PASSWD" -U "$PASSWORDS" || die "mosquitto_passwd -U $PASSWORDS failed"
HASH="$(head -n 1 "$PASSWORDS" | cut -d: -f2 | cut -d'$' -f1-3)"
[[ "$HASH" == "\$7\$"* ]] || die "mosquitto_passwd wrote '$HASH' hashes, not \$7\$ (PBKDF2-SHA512)"
HASH_LABEL="$HASH\$... (PBKDF2-SHA512, $(cut -d'$' -f3 <<<"$HASH") iterations)"
chmod a+r "$WORK" "$PASSWORDS"  # Mosquitto started as root reads it as the account it switches to
log "password file: $DEVICES accounts, $HASH_LABEL, made by $MOSQUITTO_PASSWD -U"

# --- brokers with the password file ----------------------------------------------------------
# start_auth_broker NAME TAG -> sets BROKER_PID, BROKER_PORT, BROKER_LOG, HTTP_PORT (Heartwire).
# A port reported free can be taken before the broker binds it: a few retries.
start_auth_broker() {
  local name="$1" tag="$2" attempt
  for attempt in 1 2 3 4 5; do
    BROKER_PORT="$(free_port)"
    HTTP_PORT="$(free_port)"
    BROKER_LOG="$WORK/$tag.log"
    case "$name" in
      heartwire)
        mkdir -p "$WORK/$tag"
        (cd "$WORK/$tag" && \
          exec env BROKER_MQTT__LISTEN="127.0.0.1:$BROKER_PORT" BROKER_HTTP__LISTEN="127.0.0.1:$HTTP_PORT" \
            BROKER_AUTH__PASSWORD_FILE="$PASSWORDS" RUST_LOG=warn \
            "${BROKER_PIN[@]}" "$HEARTWIRE") >"$BROKER_LOG" 2>&1 &
        ;;
      mosquitto)
        cat >"$WORK/$tag.conf" <<EOF
listener $BROKER_PORT 127.0.0.1
allow_anonymous false
password_file $PASSWORDS
max_keepalive 65535
persistence false
user $(id -un)
log_dest stderr
log_type error
log_type warning
EOF
        "${BROKER_PIN[@]}" "$MOSQUITTO" -c "$WORK/$tag.conf" >"$BROKER_LOG" 2>&1 &
        ;;
    esac
    BROKER_PID=$!
    PIDS+=("$BROKER_PID")
    if wait_tcp "$BROKER_PORT" "$BROKER_PID" "$name"; then return 0; fi
    wait "$BROKER_PID" 2>/dev/null || true
    log "$name exited during startup on port $BROKER_PORT (attempt $attempt): $(grep -m 1 -iE 'error|in use' "$BROKER_LOG" || tail -n 1 "$BROKER_LOG")"
    cp "$BROKER_LOG" "$BROKER_LOG.attempt$attempt"
  done
  die "$name failed to start 5 times (see $BROKER_LOG):
$(head -n 20 "$BROKER_LOG" 2>/dev/null)"
}

# connect_rate TAG TIMEOUT ARGS...: one loadgen connect-rate against the running broker; sets
# LINE to its summary line or to a sentence saying what failed.
connect_rate() {
  local tag="$1" bound="$2" rc=0
  shift 2
  LINE="$(timeout -k 5 "$bound" "${LOADGEN_PIN[@]}" "$LOADGEN" --host 127.0.0.1 --port "$BROKER_PORT" \
      --broker-pid "$BROKER_PID" --keepalive "$KEEPALIVE" --step-timeout "$STEP_TIMEOUT" \
      --json "$WORK/$tag.json" connect-rate --client-prefix dev- --password-seed "$SEED" \
      "$@" 2>"$WORK/$tag.loadgen.err")" || rc=$?
  if (( rc != 0 )) || [[ -z "$LINE" ]]; then
    LINE="loadgen failed (exit $rc): $(tail -n 1 "$WORK/$tag.loadgen.err")"
  fi
  log "  $LINE"
}

# verifications: Heartwire's password checks so far by outcome, "cache_hit=N verified=N
# rejected=N" (empty for Mosquitto or when /metrics cannot be read).
verifications() {
  [[ "$1" == heartwire ]] || return 0
  curl -fsS --max-time 5 "http://127.0.0.1:$HTTP_PORT/metrics" 2>/dev/null \
    | awk -F'[{}" ]' '/^heartwire_auth_verifications_total\{/ { printf "%s=%s ", $3, $NF }' || true
}

# stop_broker NAME: stops the running broker, noting if it had exited on its own.
stop_broker() {
  kill -0 "$BROKER_PID" 2>/dev/null || log "  $1 exited during the run (see $BROKER_LOG)"
  stop_pid "$BROKER_PID" TERM
}

declare -A STORM1 STORM2 STORM_CHECKS ALONE FLOODED FLOOD_CHECKS
for (( run = 1; run <= RUNS; run++ )); do
  for b in $BROKERS; do
    key="$b/$run"
    log "== run $run, $b: reconnect storm, $DEVICES devices at $STORM_RATE/s, twice (CORES=$CORES, load average $(machine_load))"
    start_auth_broker "$b" "$b-storm-$run"
    connect_rate "$b-storm-$run-1" "$STORM_TIMEOUT" --connections "$DEVICES" --rate "$STORM_RATE" \
      --source "$SOURCES"
    STORM1["$key"]="$LINE"
    (( ROUND_GAP == 0 )) || sleep "$ROUND_GAP"
    connect_rate "$b-storm-$run-2" "$STORM_TIMEOUT" --connections "$DEVICES" --rate "$STORM_RATE" \
      --source "$SOURCES"
    STORM2["$key"]="$LINE"
    STORM_CHECKS["$key"]="$(verifications "$b")"
    stop_broker "$b"

    log "== run $run, $b: $LEGIT devices at $LEGIT_RATE/s alone, then with $FLOOD wrong passwords at $FLOOD_RATE/s (load average $(machine_load))"
    start_auth_broker "$b" "$b-flood-$run"
    connect_rate "$b-alone-$run" "$FLOOD_TIMEOUT" --connections "$LEGIT" --rate "$LEGIT_RATE" \
      --source "$SOURCES"
    ALONE["$key"]="$LINE"
    connect_rate "$b-flooded-$run" "$FLOOD_TIMEOUT" --connections "$LEGIT" --rate "$LEGIT_RATE" \
      --start-number "$LEGIT" --source "$SOURCES" --flood "$FLOOD" --flood-rate "$FLOOD_RATE" \
      --flood-start-number $(( 2 * LEGIT )) --flood-source "$FLOOD_SOURCES"
    FLOODED["$key"]="$LINE"
    FLOOD_CHECKS["$key"]="$(verifications "$b")"
    stop_broker "$b"
  done
done

# --- report -----------------------------------------------------------------------------------
# errors LINE: refused + failed of a connect-rate line ("-" if it is not one).
errors() {
  [[ "$1" == connect-rate* ]] || { printf -- '-'; return; }
  printf '%s' $(( $(field refused "$1") + $(field failed "$1") ))
}
# latency LINE: "p50 / p99 / max" of its CONNACKs.
latency() {
  [[ "$1" == connect-rate* ]] || { printf -- '-'; return; }
  printf '%s / %s / %s' "$(field connack_p50_ms "$1")" "$(field connack_p99_ms "$1")" "$(field connack_max_ms "$1")"
}
# change BEFORE AFTER: the relative change of AFTER over BEFORE, in percent.
change() {
  awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b != "-") printf "%+.0f %%", (b - a) * 100 / a; else printf "-" }'
}

echo
echo "Reconnect storm: $DEVICES devices with their own user name and password (one password file, $HASH_LABEL, made by mosquitto_passwd) connect at $STORM_RATE/s, disconnect, and connect again at $STORM_RATE/s (after ${ROUND_GAP}s); CORES=$CORES, NICE=$NICE ($(nproc) cores, load average $(machine_load))"
fmt='%-10s | %3s | %5s | %9s | %24s | %6s | %14s | %9s | %24s | %6s | %14s | %s\n'
# shellcheck disable=SC2059
printf "$fmt" broker run round connected "connack p50/p99/max ms" errors "CPU ms/connect" \
  connected "connack p50/p99/max ms" errors "CPU ms/connect" "password checks (Heartwire)"
for (( run = 1; run <= RUNS; run++ )); do
  for b in $BROKERS; do
    key="$b/$run" one="${STORM1[$b/$run]}" two="${STORM2[$b/$run]}"
    [[ "$one" == connect-rate* ]] || echo "$b | run $run | round 1: $one"
    [[ "$two" == connect-rate* ]] || echo "$b | run $run | round 2: $two"
    # shellcheck disable=SC2059
    printf "$fmt" "$b" "$run" "1 / 2" "$(field connected "$one")" "$(latency "$one")" "$(errors "$one")" \
      "$(field broker_cpu_ms_per_connect "$one")" "$(field connected "$two")" "$(latency "$two")" \
      "$(errors "$two")" "$(field broker_cpu_ms_per_connect "$two")" "${STORM_CHECKS[$key]:--}"
  done
done
echo "connack: from the start of the TCP connect to the CONNACK; errors: refused or unanswered"
echo "connects; CPU ms/connect: the broker's user+system CPU over the round / connects answered."

echo
echo "Wrong-password flood: $LEGIT devices at $LEGIT_RATE/s alone, then $LEGIT others at $LEGIT_RATE/s while $FLOOD CONNECTs with wrong passwords (for existing accounts) arrive at $FLOOD_RATE/s from $FLOOD_SOURCES"
fmt='%-10s | %3s | %24s | %6s | %24s | %6s | %10s | %27s | %24s | %s\n'
# shellcheck disable=SC2059
printf "$fmt" broker run "alone p50/p99/max ms" errors "flooded p50/p99/max ms" errors "p99 change" \
  "flood refused/accepted/lost" "refusal p50/p99/max ms" "password checks (Heartwire)"
for (( run = 1; run <= RUNS; run++ )); do
  for b in $BROKERS; do
    key="$b/$run" alone="${ALONE[$b/$run]}" flooded="${FLOODED[$b/$run]}"
    [[ "$alone" == connect-rate* ]] || echo "$b | run $run | alone: $alone"
    [[ "$flooded" == connect-rate* ]] || echo "$b | run $run | flooded: $flooded"
    # shellcheck disable=SC2059
    printf "$fmt" "$b" "$run" "$(latency "$alone")" "$(errors "$alone")" "$(latency "$flooded")" \
      "$(errors "$flooded")" "$(change "$(field connack_p99_ms "$alone")" "$(field connack_p99_ms "$flooded")")" \
      "$(field flood_refused "$flooded")/$(field flood_accepted "$flooded")/$(field flood_failed "$flooded")" \
      "$(field flood_refusal_p50_ms "$flooded") / $(field flood_refusal_p99_ms "$flooded") / $(field flood_refusal_max_ms "$flooded")" \
      "${FLOOD_CHECKS[$key]:--}"
  done
done
echo "p99 change: the legitimate devices' CONNACK p99 under the flood against alone. Flood"
echo "refused/accepted/lost: wrong-password CONNECTs answered with a refusal, let in, unanswered;"
echo "refusal: time to the refusing CONNACK (Heartwire delays refusals in a row from one address)."
