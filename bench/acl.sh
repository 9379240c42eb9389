#!/usr/bin/env bash
# Benchmark: the CPU an ACL of ACL_RULES rules adds per published message, Heartwire vs
# Mosquitto, same run, same load generator (bench/loadgen fan-in at a fixed rate).
#
# For each broker, twice: without an ACL, then with an ACL file of ACL_RULES rules that apply
# to the clients of the run (the anonymous section: ACL_RULES - 1 rules on other topics,
# `topic readwrite other/<i>/#`, then `topic readwrite in/#`, the one that allows the run's
# traffic; Mosquitto walks a client's rules in order, Heartwire decides a topic once per
# connection and remembers). PUBLISHERS publishers send QoS 0 messages to in/<i> at RATE
# messages per second in total, one subscriber on in/# receives them; after WARMUP seconds a
# DURATION-second window measures the broker's CPU time per delivered message. Each broker runs
# RUNS times without and with the ACL, alternating (run-to-run noise on a shared machine is
# about 10 %); the table gives every run and the rise of the medians. The goal for Heartwire
# is at most +10 %.
#
# Environment (all optional):
#   ACL_RULES=10000    rules in the ACL file
#   PUBLISHERS=200     publisher connections
#   RATE=20000         messages per second over all publishers
#   PAYLOAD_SIZE=64    payload bytes per message
#   WARMUP=5           seconds of publishing before the window
#   DURATION=15        seconds of the measurement window
#   CORES=1            1: broker pinned to core 0, loadgen to core 1; 2: neither pinned
#   RUNS=3             runs without and with the ACL per broker
#   BROKERS="heartwire mosquitto"   which brokers to measure, in order
#   KEEP_WORK=1        keep the temporary directory (configs, ACL file, logs, JSON reports)
#   HEARTWIRE_BIN=PATH use this broker binary instead of building target/release/broker
# All traffic stays on loopback; every wait is bounded and all started processes are stopped.
set -euo pipefail

ACL_RULES="${ACL_RULES:-10000}"
PUBLISHERS="${PUBLISHERS:-200}"
RATE="${RATE:-20000}"
PAYLOAD_SIZE="${PAYLOAD_SIZE:-64}"
WARMUP="${WARMUP:-5}"
DURATION="${DURATION:-15}"
RUNS="${RUNS:-3}"
CORES="${CORES:-1}"
BROKERS="${BROKERS:-heartwire mosquitto}"
BROKER_START_TIMEOUT=20
STOP_TIMEOUT=30

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BENCH_TAG=acl
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
# shellcheck source=bench/brokers.sh
source "$ROOT/bench/brokers.sh"

for v in ACL_RULES PUBLISHERS RATE PAYLOAD_SIZE WARMUP DURATION RUNS; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number"
done
(( ACL_RULES >= 1 && PUBLISHERS > 0 && RATE > 0 && DURATION > 0 && RUNS > 0 )) || die "ACL_RULES, PUBLISHERS, RATE, DURATION and RUNS must be positive"
LOADGEN_TIMEOUT=$(( WARMUP + DURATION + 180 ))

bench_setup acl-bench
loadgen_prerequisites

ACL_FILE="$WORK/acl"
{
  echo "# $ACL_RULES rules for anonymous clients; the last one allows the run's traffic"
  for (( i = 1; i < ACL_RULES; i++ )); do echo "topic readwrite other/$i/#"; done
  echo "topic readwrite in/#"
} >"$ACL_FILE"
log "ACL file: $(grep -c '^topic' "$ACL_FILE") rules"

declare -A RESULT
measure() {
  local name="$1" acl="$2" run="$3" tag="$1-$2-$3" line rc=0
  log "== $name, ACL: $acl, run $run of $RUNS (CORES=$CORES, load average $(machine_load))"
  if [[ "$acl" == none ]]; then
    unset BROKER_AUTH__ACL_FILE MOSQUITTO_EXTRA_CONF
  else
    export BROKER_AUTH__ACL_FILE="$ACL_FILE" MOSQUITTO_EXTRA_CONF="acl_file $ACL_FILE"
  fi
  start_broker "$name" "$tag"
  line="$(timeout -k 5 "$LOADGEN_TIMEOUT" "${LOADGEN_PIN[@]}" "$LOADGEN" \
      --host 127.0.0.1 --port "$BROKER_PORT" --broker-pid "$BROKER_PID" --json "$WORK/$tag.json" \
      fan-in --publishers "$PUBLISHERS" --payload-size "$PAYLOAD_SIZE" --rate "$RATE" \
      --warmup "$WARMUP" --duration "$DURATION" 2>"$WORK/$tag.loadgen.err")" || rc=$?
  if (( rc != 0 )) || [[ -z "$line" ]]; then
    log "  loadgen failed (exit $rc): $(tail -n 3 "$WORK/$tag.loadgen.err")"
    RESULT["$tag"]=""
  else
    log "  $line"
    RESULT["$tag"]="$line"
  fi
  kill -0 "$BROKER_PID" 2>/dev/null || log "  $name exited during the run (see $BROKER_LOG)"
  stop_pid "$BROKER_PID" TERM
  unset BROKER_AUTH__ACL_FILE MOSQUITTO_EXTRA_CONF
}

for b in $BROKERS; do
  for (( r = 1; r <= RUNS; r++ )); do
    measure "$b" none "$r"
    measure "$b" rules "$r"
  done
done

# median of the numbers given (one per argument; "-" when none)
median() {
  printf '%s\n' "$@" | grep -E '^[0-9.]+$' | sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) { print "-"; exit }
    if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# --- report ---------------------------------------------------------------------------------
echo
echo "ACL cost: $PUBLISHERS publishers -> 1 subscriber on in/#, QoS 0, ${PAYLOAD_SIZE}-byte payload, $RATE msg/s; ACL of $ACL_RULES rules; warm-up ${WARMUP}s, window ${DURATION}s; $RUNS runs each; CORES=$CORES ($(nproc) cores, load average $(machine_load))"
fmt='%-10s | %-28s | %-28s | %-22s | %8s\n'
# shellcheck disable=SC2059
printf "$fmt" broker "CPU µs/msg, no ACL (runs)" "CPU µs/msg, $ACL_RULES rules (runs)" "delivered msg/s (min)" "rise"
for b in $BROKERS; do
  plain=() ruled=() delivered=()
  for (( r = 1; r <= RUNS; r++ )); do
    for acl in none rules; do
      line="${RESULT[$b-$acl-$r]}"
      v="$(field broker_cpu_us_per_delivered "$line")"
      if [[ "$acl" == none ]]; then plain+=("$v"); else ruled+=("$v"); fi
      delivered+=("$(field delivered_per_s "$line")")
    done
  done
  a="$(median "${plain[@]}")" r="$(median "${ruled[@]}")"
  rise="$(awk -v a="$a" -v r="$r" 'BEGIN { if (a > 0 && r > 0) printf "%+.1f %%", (r / a - 1) * 100; else print "-" }')"
  low="$(printf '%s\n' "${delivered[@]}" | grep -E '^[0-9]+$' | sort -n | head -n 1)"
  # shellcheck disable=SC2059
  printf "$fmt" "$b" "$a (${plain[*]})" "$r (${ruled[*]})" "${low:--}" "$rise"
done
echo "rise: median with the ACL against median without; a failed run shows as '-'."
