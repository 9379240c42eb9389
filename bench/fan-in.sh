#!/usr/bin/env bash
# Benchmark: fan-in under overload, Heartwire vs Mosquitto, same run, same load generator.
#
# For each broker in turn: start it on a free loopback port, then run bench/loadgen's fan-in:
# PUBLISHERS connections publish QoS 0 messages of PAYLOAD_SIZE bytes to in/<i> as fast as
# their sockets take (or RATE msg/s in total), and one subscriber on in/# counts what it
# receives. After WARMUP seconds a DURATION-second window measures messages written, read by
# the broker (written less what piled up in the kernel's socket queues) and delivered per
# second, the broker's CPU time per delivered message, its RSS (when publishing starts, peak
# sampled every 250 ms, end), and the generator's own CPU. A table follows.
#
# Environment (all optional):
#   PUBLISHERS=1000    publisher connections
#   PAYLOAD_SIZE=64    payload bytes per message
#   RATE=              total messages per second over all publishers; unset: unbounded
#   WARMUP=5           seconds of publishing before the window
#   DURATION=20        seconds of the measurement window
#   CORES=1            1: broker pinned to core 0, loadgen to core 1 (taskset); 2: neither
#                      pinned, both share both cores
#   BROKERS="heartwire mosquitto"   which brokers to measure, in order
#   KEEP_WORK=1        keep the temporary directory with logs, configs and JSON reports
#   HEARTWIRE_BIN=PATH use this broker binary instead of building target/release/broker
# Any BROKER_* variables in the environment reach the Heartwire broker unchanged;
# the script itself sets BROKER_MQTT__LISTEN, BROKER_HTTP__LISTEN=127.0.0.1:0 and RUST_LOG=warn;
# the broker runs in a temporary directory, so its SQLite file and journal start empty.
# Mosquitto runs with a generated config: the listener, allow_anonymous true, defaults otherwise.
#
# Needs root only to install mosquitto (apt-get) when it is missing. All traffic stays
# on loopback; every wait is bounded and all started processes are stopped on exit.
set -euo pipefail

PUBLISHERS="${PUBLISHERS:-1000}"
PAYLOAD_SIZE="${PAYLOAD_SIZE:-64}"
RATE="${RATE:-}"
WARMUP="${WARMUP:-5}"
DURATION="${DURATION:-20}"
CORES="${CORES:-1}"
BROKERS="${BROKERS:-heartwire mosquitto}"
BROKER_START_TIMEOUT=20   # seconds until a broker must accept TCP
STOP_TIMEOUT=30           # seconds a process gets to exit after a signal

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BENCH_TAG=fan-in
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
# shellcheck source=bench/brokers.sh
source "$ROOT/bench/brokers.sh"

for v in PUBLISHERS PAYLOAD_SIZE WARMUP DURATION; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number"
done
(( PUBLISHERS > 0 && DURATION > 0 )) || die "PUBLISHERS and DURATION must be positive"
[[ -z "$RATE" || "$RATE" =~ ^[0-9]+$ ]] || die "RATE must be a whole number of messages per second"
RATE_ARGS=()
[[ -n "$RATE" ]] && RATE_ARGS=(--rate "$RATE")
# The generator bounds every step itself; this outer bound covers connecting and winding down.
LOADGEN_TIMEOUT=$(( WARMUP + DURATION + 180 ))

bench_setup fan-in-bench
loadgen_prerequisites
(( PUBLISHERS + 64 <= $(ulimit -n) )) || die "PUBLISHERS=$PUBLISHERS exceeds the open-file limit $(ulimit -n)"

declare -A RESULT
measure() {
  local name="$1" tag="$1-fan-in"
  log "== $name (CORES=$CORES, load average $(machine_load))"
  start_broker "$name" "$tag"
  log "$name pid=$BROKER_PID port=$BROKER_PORT; $PUBLISHERS publishers, ${PAYLOAD_SIZE}-byte payload, ${RATE:-unbounded} msg/s, warm-up ${WARMUP}s, window ${DURATION}s"
  local line rc=0
  line="$(timeout -k 5 "$LOADGEN_TIMEOUT" "${LOADGEN_PIN[@]}" "$LOADGEN" \
      --host 127.0.0.1 --port "$BROKER_PORT" --broker-pid "$BROKER_PID" --json "$WORK/$tag.json" \
      fan-in --publishers "$PUBLISHERS" --payload-size "$PAYLOAD_SIZE" "${RATE_ARGS[@]}" \
      --warmup "$WARMUP" --duration "$DURATION" 2>"$WORK/$tag.loadgen.err")" || rc=$?
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
echo "Fan-in: $PUBLISHERS publishers -> 1 subscriber on in/#, QoS 0, ${PAYLOAD_SIZE}-byte payload, ${RATE:-unbounded} msg/s; warm-up ${WARMUP}s, window ${DURATION}s; CORES=$CORES ($(nproc) cores, load average $(machine_load))"
fmt='%-10s | %13s | %18s | %15s | %17s | %9s | %12s | %16s | %21s | %15s | %13s\n'
# shellcheck disable=SC2059
printf "$fmt" broker "written msg/s" "read by broker/s" "delivered msg/s" "delivered/s range" "dropped %" "broker CPU %" "CPU µs/delivered" "RSS start/peak/end MB" "queued MB (end)" "loadgen CPU %"
for b in $BROKERS; do
  IFS='|' read -r n line <<<"${RESULT[$b]}"
  if [[ "$line" != fan-in* ]]; then
    echo "$n | $line"
    continue
  fi
  # shellcheck disable=SC2059
  printf "$fmt" "$n" "$(field written_per_s "$line")" "$(field read_by_broker_per_s "$line")" \
    "$(field delivered_per_s "$line")" \
    "$(field delivered_min_per_s "$line")-$(field delivered_max_per_s "$line")" \
    "$(field dropped_pct "$line")" "$(field broker_cpu_pct "$line")" \
    "$(field broker_cpu_us_per_delivered "$line")" \
    "$(kib_to_mib "$(field rss_start_kib "$line")")/$(kib_to_mib "$(field rss_peak_kib "$line")")/$(kib_to_mib "$(field rss_end_kib "$line")")" \
    "$(field queued_mib_end "$line")" "$(field loadgen_cpu_pct "$line")"
done
echo "written: whole messages the publishers' sockets accepted; read by broker: written less the growth"
echo "of the bytes queued in the kernel on the connections to the broker (queued MB: their total at the"
echo "end of the window); dropped: 1 - delivered / read by broker."

