#!/usr/bin/env bash
# Benchmark: what MQTT 5 clients cost a broker next to MQTT 3.1.1 clients, Heartwire and
# Mosquitto (the reference; it speaks both), same run, same build, same load generator.
#
# For each broker and each protocol level (4 = 3.1.1, 5 = MQTT 5; bench/loadgen --protocol),
# back to back and each on a freshly started broker:
#   - idle: COUNT connections (from 127.0.0.2 and 127.0.0.3 to the broker on 127.0.0.1), the
#     broker's RSS before the first and SETTLE seconds after the last: KiB per idle connection;
#   - fan-in at QoS 0 and at QoS 1 (QOS): PUBLISHERS publishers send PAYLOAD_SIZE-byte messages
#     to in/<i> at RATE msg/s in total, one subscriber on in/# (at the same QoS, acknowledging
#     each message) counts them; after WARMUP seconds a DURATION-second window measures the
#     broker's CPU time (utime + stime from /proc) per delivered message. Then the publishers
#     stop and the subscriber reads what is on its way: the run's totals of messages written
#     and delivered (and, at QoS 1, PUBACKs received) are compared, so no loss goes unseen.
# A table follows, with the ratio MQTT 5 / 3.1.1 per broker (the goal for Heartwire: at most
# 1.10 for CPU per message and for memory per idle connection). With RUNS > 1 the whole
# sequence repeats, every other run with protocol 5 first, and every run gets its rows.
#
# Environment (all optional):
#   COUNT=10000        idle connections per broker and protocol
#   SETTLE=5           seconds between the last CONNACK and the RSS reading
#   PUBLISHERS=200     publisher connections of the fan-in
#   RATE=20000         messages per second over all publishers
#   PAYLOAD_SIZE=64    payload bytes per message
#   QOS="0 1"          the QoS levels of the fan-in (QOS="": idle connections only)
#   WARMUP=5           seconds of publishing before the window
#   DURATION=15        seconds of the measurement window
#   RUNS=1             repetitions of the whole sequence
#   CORES=1            1: broker pinned to core 0, loadgen to core 1; 2: neither pinned
#   NICE=0             niceness of the brokers and loadgen (e.g. -10, as root, on a shared machine)
#   BROKERS="heartwire mosquitto"   which brokers to measure, in order
#   PROTOCOLS="4 5"    protocol levels, in order
#   KEEP_WORK=1        keep the temporary directory (configs, logs, JSON reports)
#   HEARTWIRE_BIN=PATH use this broker binary instead of building target/release/broker
# Any BROKER_* variables in the environment reach the Heartwire broker unchanged;
# MOSQUITTO_EXTRA_CONF adds lines to Mosquitto's configuration (e.g. "max_queued_messages 0":
# by default it queues at most 1,000 messages per subscriber and drops QoS 1 messages beyond).
#
# Needs root only to install mosquitto (apt-get) when it is missing, and for a negative NICE.
# All traffic stays on loopback; every wait is bounded and all started processes are stopped.
set -euo pipefail

COUNT="${COUNT:-10000}"
SETTLE="${SETTLE:-5}"
PUBLISHERS="${PUBLISHERS:-200}"
RATE="${RATE:-20000}"
PAYLOAD_SIZE="${PAYLOAD_SIZE:-64}"
QOS="${QOS-0 1}"
WARMUP="${WARMUP:-5}"
DURATION="${DURATION:-15}"
RUNS="${RUNS:-1}"
CORES="${CORES:-1}"
NICE="${NICE:-0}"
BROKERS="${BROKERS:-heartwire mosquitto}"
PROTOCOLS="${PROTOCOLS:-4 5}"
SOURCES="127.0.0.2,127.0.0.3"
BROKER_START_TIMEOUT=20
STOP_TIMEOUT=30

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BENCH_TAG=mqtt5
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
# shellcheck source=bench/brokers.sh
source "$ROOT/bench/brokers.sh"

for v in COUNT SETTLE PUBLISHERS RATE PAYLOAD_SIZE WARMUP DURATION RUNS; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number"
done
(( COUNT > 0 && PUBLISHERS > 0 && RATE > 0 && DURATION > 0 && RUNS > 0 )) || die "COUNT, PUBLISHERS, RATE, DURATION and RUNS must be positive"
for q in $QOS; do [[ "$q" == 0 || "$q" == 1 ]] || die "QOS holds 0 and/or 1"; done
for p in $PROTOCOLS; do [[ "$p" == 4 || "$p" == 5 ]] || die "PROTOCOLS holds 4 and/or 5"; done
[[ "$NICE" =~ ^-?[0-9]+$ ]] || die "NICE must be a whole number from -20 to 19"
(( NICE >= -20 && NICE <= 19 )) || die "NICE must be a whole number from -20 to 19"
(( NICE >= 0 || $(id -u) == 0 )) || die "NICE=$NICE: a negative niceness needs root"
IDLE_TIMEOUT=$(( COUNT / 100 + SETTLE + 120 ))
FAN_IN_TIMEOUT=$(( WARMUP + DURATION + 120 ))

bench_setup mqtt5-bench
loadgen_prerequisites
if (( NICE != 0 )); then
  BROKER_PIN=(nice -n "$NICE" ${BROKER_PIN[@]+"${BROKER_PIN[@]}"})
  LOADGEN_PIN=(nice -n "$NICE" ${LOADGEN_PIN[@]+"${LOADGEN_PIN[@]}"})
fi
# The loadgen and each broker hold one descriptor per connection.
NOFILE_HARD="$(ulimit -Hn)"
[[ "$NOFILE_HARD" == unlimited ]] && NOFILE_HARD="$(cat /proc/sys/fs/nr_open)"
ulimit -n "$NOFILE_HARD"
(( COUNT + 64 <= $(ulimit -n) )) || die "COUNT=$COUNT exceeds the open-file limit $(ulimit -n)"

declare -A RESULT

# measure RUN BROKER PROTOCOL: idle, then fan-in at each QoS, each on a fresh broker.
measure() {
  local run="$1" name="$2" proto="$3" tag q
  tag="r$run-$name-v$proto-idle"
  log "== run $run: $name, protocol $proto, $COUNT idle connections (load average $(machine_load))"
  start_broker "$name" "$tag"
  RESULT["$run|$name|$proto|idle"]="$(loadgen "$tag" "$IDLE_TIMEOUT" --protocol "$proto" \
      --source "$SOURCES" idle --connections "$COUNT" --settle "$SETTLE")"
  kill -0 "$BROKER_PID" 2>/dev/null || log "  $name exited during the run (see $BROKER_LOG)"
  stop_pid "$BROKER_PID" TERM
  for q in $QOS; do
    tag="r$run-$name-v$proto-q$q"
    log "== run $run: $name, protocol $proto, fan-in QoS $q: $PUBLISHERS publishers, $RATE msg/s (load average $(machine_load))"
    start_broker "$name" "$tag"
    RESULT["$run|$name|$proto|q$q"]="$(loadgen "$tag" "$FAN_IN_TIMEOUT" --protocol "$proto" \
        fan-in --publishers "$PUBLISHERS" --rate "$RATE" --qos "$q" \
        --payload-size "$PAYLOAD_SIZE" --warmup "$WARMUP" --duration "$DURATION")"
    kill -0 "$BROKER_PID" 2>/dev/null || log "  $name exited during the run (see $BROKER_LOG)"
    stop_pid "$BROKER_PID" TERM
  done
}

MOSQUITTO_VERSION="$("$MOSQUITTO" -h 2>/dev/null | head -n 1 | awk '{ print $3 }' || true)"
for (( run = 1; run <= RUNS; run++ )); do
  order="$PROTOCOLS"
  (( run % 2 == 0 )) && order="$(tr ' ' '\n' <<<"$PROTOCOLS" | tac | tr '\n' ' ')"
  for b in $BROKERS; do
    for p in $order; do measure "$run" "$b" "$p"; done
  done
done

# --- report ---------------------------------------------------------------------------------
# ratio A B: B / A with two decimals, "-" unless both are numbers.
ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN {
    if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && a + 0 > 0) printf "%.2f", b / a; else printf "-" }'
}
# totals LINE: "written/delivered" of the run, with the PUBACKs at QoS 1 and a LOSS mark.
totals() {
  local line="$1" w d a u
  w="$(field written_total "$line")"; d="$(field delivered_total "$line")"
  a="$(field acked_total "$line")"; u="$(field undelivered_total "$line")"
  [[ "$w" == - ]] && { printf '%s' -; return; }
  printf '%s/%s' "$w" "$d"
  [[ "$(field qos "$line")" == 1 ]] && printf ' (%s acked)' "$a"
  [[ "$u" != 0 ]] && printf ' LOSS %s' "$u"
  true
}
label() { if [[ "$1" == heartwire ]]; then echo Heartwire; else echo "Mosquitto ${MOSQUITTO_VERSION}"; fi; }

echo
fan_in="no fan-in"
[[ -n "$QOS" ]] && fan_in="fan-in $PUBLISHERS publishers -> 1 subscriber, ${PAYLOAD_SIZE}-byte messages at $RATE msg/s, warm-up ${WARMUP}s, window ${DURATION}s"
echo "MQTT 5 next to MQTT 3.1.1: $COUNT idle connections; $fan_in; CORES=$CORES NICE=$NICE ($(nproc) cores, load average $(machine_load))"
fmt='%-4s| %-18s| %-8s| %13s'
for q in $QOS; do fmt+=" | %11s | %7s | %28s"; done
fmt+='\n'
header=(run broker proto "KiB/idle conn")
for q in $QOS; do header+=("QoS $q msg/s" "µs/msg" "QoS $q written/delivered"); done
# shellcheck disable=SC2059
printf "$fmt" "${header[@]}"
for (( run = 1; run <= RUNS; run++ )); do
  for b in $BROKERS; do
    for p in $PROTOCOLS; do
      idle="${RESULT[$run|$b|$p|idle]}"
      row=("$run" "$(label "$b")" "$([[ $p == 4 ]] && echo 3.1.1 || echo 5)" "$(field kib_per_connection "$idle")")
      for q in $QOS; do
        line="${RESULT[$run|$b|$p|q$q]}"
        row+=("$(field delivered_per_s "$line")" "$(field broker_cpu_us_per_delivered "$line")" "$(totals "$line")")
      done
      # shellcheck disable=SC2059
      printf "$fmt" "${row[@]}"
    done
    if [[ " $PROTOCOLS " == *" 4 "* && " $PROTOCOLS " == *" 5 "* ]]; then
      row=("$run" "$(label "$b")" "5/3.1.1"
        "$(ratio "$(field kib_per_connection "${RESULT[$run|$b|4|idle]}")" "$(field kib_per_connection "${RESULT[$run|$b|5|idle]}")")")
      for q in $QOS; do
        row+=("" "$(ratio "$(field broker_cpu_us_per_delivered "${RESULT[$run|$b|4|q$q]}")" \
                          "$(field broker_cpu_us_per_delivered "${RESULT[$run|$b|5|q$q]}")")" "")
      done
      # shellcheck disable=SC2059
      printf "$fmt" "${row[@]}"
    fi
  done
done
echo "KiB/idle conn: (broker RSS ${SETTLE}s after the last CONNACK - before the first) / connections;"
echo "µs/msg: broker CPU (utime + stime) over the window / messages delivered in it; written/delivered:"
echo "the run's totals (warm-up, window and a drain of at most 5 s after the publishers stop);"
echo "5/3.1.1: the MQTT 5 figure divided by the 3.1.1 one (goal for Heartwire: at most 1.10)."
