#!/usr/bin/env bash
# Benchmark: one SUBSCRIBE of many filters over many retained messages, and the round trips of
# a bystander meanwhile; Heartwire vs Mosquitto, same run, same load generator.
#
# For each broker in turn: start it on a free loopback port, then run bench/loadgen's
# retained-subscribe: load RETAINED retained messages (topics r/<i/1000>/<i%1000>, confirmed
# stored through a retained sentinel per loading connection), start a bystander doing
# back-to-back QoS 0 round trips on its own topic, then send ONE SUBSCRIBE of FILTERS filters
# (WILDCARD_SHARE of them with wildcards) and read every retained message it brings. Reports
# the time to SUBACK, the return codes, the retained messages received against those expected
# and the time of the last, the bystander's round-trip p50/p99/max from the SUBSCRIBE until the
# last retained message, and the broker's CPU and RSS. A table follows.
#
# Environment (all optional):
#   RETAINED=100000    retained messages loaded first
#   FILTERS=10000      topic filters in the one SUBSCRIBE
#   WILDCARD_SHARE=0.1 share of the filters with wildcards (r/<k>/+, then r/+/<j>)
#   PAYLOAD_SIZE=1     payload bytes of each retained message
#   TIMEOUT=60         bound on the subscribe phase, seconds; what arrived by then is reported
#   IDLE_TIMEOUT=5     after the SUBACK, the phase also ends when nothing arrived for this long
#   CORES=1            1: broker pinned to core 0, loadgen to core 1 (taskset); 2: neither
#                      pinned, both share both cores
#   BROKERS="heartwire mosquitto"   which brokers to measure, in order
#   KEEP_WORK=1        keep the temporary directory with logs, configs and JSON reports
#   HEARTWIRE_BIN=PATH use this broker binary instead of building target/release/broker
# Any BROKER_* variables in the environment reach the Heartwire broker unchanged;
# the script itself sets BROKER_MQTT__LISTEN, BROKER_HTTP__LISTEN=127.0.0.1:0 and RUST_LOG=warn,
# and BROKER_MQTT__MAX_FILTERS_PER_SUBSCRIBE=FILTERS unless given (Heartwire grants 1,000 filters
# per SUBSCRIBE by default; Mosquitto has no such limit);
# the broker runs in a temporary directory, so its SQLite file and journal start empty.
# Mosquitto runs with a generated config: the listener, allow_anonymous true, defaults otherwise.
#
# Needs root only to install mosquitto (apt-get) when it is missing. All traffic stays
# on loopback; every wait is bounded and all started processes are stopped on exit.
set -euo pipefail

RETAINED="${RETAINED:-100000}"
FILTERS="${FILTERS:-10000}"
WILDCARD_SHARE="${WILDCARD_SHARE:-0.1}"
PAYLOAD_SIZE="${PAYLOAD_SIZE:-1}"
TIMEOUT="${TIMEOUT:-60}"
IDLE_TIMEOUT="${IDLE_TIMEOUT:-5}"
CORES="${CORES:-1}"
BROKERS="${BROKERS:-heartwire mosquitto}"
LOAD_TIMEOUT=120          # seconds until the broker must have stored every retained message
BROKER_START_TIMEOUT=20   # seconds until a broker must accept TCP
STOP_TIMEOUT=30           # seconds a process gets to exit after a signal

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BENCH_TAG=retained-subscribe
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
# shellcheck source=bench/brokers.sh
source "$ROOT/bench/brokers.sh"

for v in RETAINED FILTERS PAYLOAD_SIZE TIMEOUT IDLE_TIMEOUT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number"
done
(( RETAINED > 0 && FILTERS > 0 && TIMEOUT > 0 )) || die "RETAINED, FILTERS and TIMEOUT must be positive"
# The generator bounds every phase itself; this outer bound covers them all and a frozen broker.
LOADGEN_TIMEOUT=$(( LOAD_TIMEOUT + TIMEOUT + 120 ))
export BROKER_MQTT__MAX_FILTERS_PER_SUBSCRIBE="${BROKER_MQTT__MAX_FILTERS_PER_SUBSCRIBE:-$FILTERS}"

bench_setup retained-subscribe-bench
loadgen_prerequisites

declare -A RESULT
measure() {
  local name="$1" tag="$1-retained"
  log "== $name (CORES=$CORES, load average $(machine_load))"
  start_broker "$name" "$tag"
  log "$name pid=$BROKER_PID port=$BROKER_PORT; $RETAINED retained, SUBSCRIBE of $FILTERS filters (wildcard share $WILDCARD_SHARE)"
  local line rc=0
  line="$(timeout -k 5 "$LOADGEN_TIMEOUT" "${LOADGEN_PIN[@]}" "$LOADGEN" \
      --host 127.0.0.1 --port "$BROKER_PORT" --broker-pid "$BROKER_PID" --json "$WORK/$tag.json" \
      retained-subscribe --retained "$RETAINED" --filters "$FILTERS" \
      --wildcard-share "$WILDCARD_SHARE" --payload-size "$PAYLOAD_SIZE" \
      --timeout "$TIMEOUT" --idle-timeout "$IDLE_TIMEOUT" --load-timeout "$LOAD_TIMEOUT" \
      2>"$WORK/$tag.loadgen.err")" || rc=$?
  if (( rc != 0 )) || [[ -z "$line" ]]; then
    log "  loadgen failed (exit $rc): $(tail -n 3 "$WORK/$tag.loadgen.err")"
    RESULT["$name"]="$name|loadgen failed (exit $rc)"
  else
    log "  $line"
    RESULT["$name"]="$name|$line"
  fi
  kill -0 "$BROKER_PID" 2>/dev/null || log "  $name exited during the run (see $BROKER_LOG)"
  stop_pid "$BROKER_PID" TERM
}

for b in $BROKERS; do measure "$b"; done

# --- report ---------------------------------------------------------------------------------
echo
echo "Retained subscribe: $RETAINED retained (${PAYLOAD_SIZE}-byte payloads), ONE SUBSCRIBE of $FILTERS filters (wildcard share $WILDCARD_SHARE); phase bound ${TIMEOUT}s, idle ${IDLE_TIMEOUT}s; CORES=$CORES ($(nproc) cores, load average $(machine_load))"
fmt='%-10s | %9s | %15s | %26s | %14s | %8s | %20s | %28s | %12s | %21s | %11s\n'
# shellcheck disable=SC2059
printf "$fmt" broker "SUBACK ms" "granted/refused" "retained received/expected" "last retained ms" "end" \
  "bystander before p99" "bystander during p50/p99/max" "broker CPU s" "RSS loaded/peak/end MB" "loadgen CPU %"
for b in $BROKERS; do
  IFS='|' read -r n line <<<"${RESULT[$b]}"
  if [[ "$line" != retained-subscribe* ]]; then
    echo "$n | $line"
    continue
  fi
  # shellcheck disable=SC2059
  printf "$fmt" "$n" "$(field suback_ms "$line")" \
    "$(field granted "$line")/$(field refused "$line")" \
    "$(field retained_received "$line")/$(field expected_retained "$line")" \
    "$(field last_retained_ms "$line")" "$(field end "$line")" \
    "$(field bystander_baseline_p99_ms "$line") ms" \
    "$(field bystander_p50_ms "$line")/$(field bystander_p99_ms "$line")/$(field bystander_max_ms "$line") ms" \
    "$(field broker_cpu_s "$line")" \
    "$(kib_to_mib "$(field rss_start_kib "$line")")/$(kib_to_mib "$(field rss_peak_kib "$line")")/$(kib_to_mib "$(field rss_end_kib "$line")")" \
    "$(field loadgen_cpu_pct "$line")"
  unanswered="$(field bystander_unanswered_ms "$line")"
  [[ "$unanswered" == none || "$unanswered" == - ]] || \
    echo "           (a bystander round trip was still unanswered after $unanswered ms when the phase ended; counted in the max)"
done
