#!/usr/bin/env bash
# Benchmark: durable state, Heartwire vs Mosquitto, same run, same load generator.
#
# 1. QoS 1 to persistent sessions. For Heartwire in each persistence mode of MODES (sync: a
#    PUBACK waits for the fsync; interval; off) and for Mosquitto (persistence true, its
#    default autosave_interval 1800), each on a fresh broker: bench/loadgen persistent-publish,
#    SUBSCRIBERS persistent sessions (clean session 0) subscribed at QoS 1 to p/<j>/#, online
#    and acknowledging (OFFLINE=1: gone after their SUBACK, so that their sessions queue),
#    PUBLISHERS publishers on p/<i % SUBSCRIBERS>/<i>, each keeping WINDOW QoS 1 messages
#    unacknowledged (closed loop). After WARMUP seconds a DURATION-second window measures
#    PUBACKs per second and the broker's CPU (utime + stime, /proc/PID/stat) per 1,000
#    acknowledged messages. Over the whole run (warm-up and window) the fsyncs per acknowledged
#    message (Heartwire: heartwire_state_fsyncs_total from /metrics; both brokers: fsync and
#    fdatasync system calls counted by `perf stat` on the syscall tracepoints, or by
#    `strace -f -c -p` when perf cannot, or "n/a") and the bytes the broker wrote to disk per
#    acknowledged message (/proc/PID/io write_bytes).
# 2. Restart with state. For Heartwire (persistence.mode sync) and Mosquitto: persistent-fill
#    creates SESSIONS persistent sessions, each subscribed to its own topic at QoS 1, and
#    queues QUEUED QoS 1 messages in each; the broker is stopped with SIGTERM (Mosquitto saves
#    its state then) and started again on the same state and port, and persistent-resume
#    measures from the start: the first accepted TCP connect, and the first and last queued
#    message of one resumed session; then the broker's RSS.
# A table follows.
#
# Environment (all optional):
#   PUBLISHERS=50      publisher connections (part 1)
#   SUBSCRIBERS=50     persistent subscribers (part 1): with 50, each publisher has its own,
#                      whose in-flight limit (Mosquitto: 20, Heartwire: 32) exceeds the window
#   OFFLINE=0          1: the subscribers leave after subscribing (their queues fill, then
#                      both brokers drop beyond 1,000 messages per session)
#   WINDOW=16          unacknowledged QoS 1 messages per publisher
#   PAYLOAD_SIZE=64    payload bytes per message (both parts)
#   WARMUP=5           seconds of publishing before the window
#   DURATION=15        seconds of the measurement window
#   MODES="sync interval off"   Heartwire's persistence modes measured in part 1
#   SESSIONS=10000     persistent sessions filled (part 2; up to 100000 and more)
#   QUEUED=10          QoS 1 messages queued in each (at most 1,000: both brokers' queue limit)
#   PARTS="publish restart"     which parts to run
#   CORES=1            1: broker pinned to core 0, loadgen to core 1 (taskset); 2: neither
#   BROKERS="heartwire mosquitto"   which brokers to measure, in order
#   FSYNC_COUNTER=auto perf, strace or none: how the fsync system calls are counted
#   KEEP_WORK=1        keep the temporary directory with logs, configs, state and JSON reports
#   HEARTWIRE_BIN=PATH use this broker binary instead of building target/release/broker
# Any BROKER_* variables in the environment reach Heartwire unchanged; the script sets the
# listeners, persistence.mode and persistence.dir. MOSQUITTO_EXTRA_CONF adds lines to
# Mosquitto's configuration.
#
# Needs root only to install mosquitto when it is missing (and perf's syscall tracepoints
# usually need root, else strace is used). All traffic stays on loopback; every wait is
# bounded and all started processes are stopped on exit.
set -euo pipefail

PUBLISHERS="${PUBLISHERS:-50}"
SUBSCRIBERS="${SUBSCRIBERS:-50}"
OFFLINE="${OFFLINE:-0}"
WINDOW="${WINDOW:-16}"
PAYLOAD_SIZE="${PAYLOAD_SIZE:-64}"
WARMUP="${WARMUP:-5}"
DURATION="${DURATION:-15}"
MODES="${MODES-sync interval off}"
SESSIONS="${SESSIONS:-10000}"
QUEUED="${QUEUED:-10}"
PARTS="${PARTS:-publish restart}"
CORES="${CORES:-1}"
BROKERS="${BROKERS:-heartwire mosquitto}"
FSYNC_COUNTER="${FSYNC_COUNTER:-auto}"
BROKER_START_TIMEOUT=20
STOP_TIMEOUT=120          # a broker saving 1,000,000 queued messages at shutdown takes a while

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BENCH_TAG=persistence
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
# shellcheck source=bench/brokers.sh
source "$ROOT/bench/brokers.sh"

for v in PUBLISHERS SUBSCRIBERS WINDOW PAYLOAD_SIZE WARMUP DURATION SESSIONS QUEUED; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number"
done
(( PUBLISHERS > 0 && SUBSCRIBERS > 0 && WINDOW > 0 && DURATION > 0 && SESSIONS > 0 && QUEUED > 0 )) \
  || die "PUBLISHERS, SUBSCRIBERS, WINDOW, DURATION, SESSIONS and QUEUED must be positive"
(( QUEUED <= 1000 )) || die "QUEUED=$QUEUED: both brokers queue at most 1,000 messages per session by default"
for m in $MODES; do
  case "$m" in sync|interval|off) ;; *) die "MODES holds sync, interval and/or off" ;; esac
done
for p in $PARTS; do
  case "$p" in publish|restart) ;; *) die "PARTS holds publish and/or restart" ;; esac
done
[[ "$OFFLINE" == 0 || "$OFFLINE" == 1 ]] || die "OFFLINE must be 0 or 1"
OFFLINE_ARGS=()
(( OFFLINE )) && OFFLINE_ARGS=(--offline)
PUBLISH_TIMEOUT=$(( WARMUP + DURATION + 120 ))
FILL_TIMEOUT=$(( SESSIONS * QUEUED / 500 + SESSIONS / 100 + 300 ))
RESUME_TIMEOUT=600

bench_setup persistence-bench
loadgen_prerequisites
(( PUBLISHERS + SUBSCRIBERS + 200 <= $(ulimit -n) )) || die "PUBLISHERS + SUBSCRIBERS exceed the open-file limit $(ulimit -n)"
command -v curl >/dev/null || die "curl is needed to read Heartwire's /metrics"

# How fsync calls are counted: perf on the syscall tracepoints costs the broker nothing
# measurable; strace stops the broker at each of its system calls (its rate drops).
case "$FSYNC_COUNTER" in
  auto)
    if command -v perf >/dev/null && perf stat -e syscalls:sys_enter_fsync true >/dev/null 2>&1; then
      FSYNC_COUNTER=perf
    elif command -v strace >/dev/null; then
      FSYNC_COUNTER=strace
    else
      FSYNC_COUNTER=none
    fi
    ;;
  perf|strace|none) ;;
  *) die "FSYNC_COUNTER is auto, perf, strace or none" ;;
esac
log "fsync system calls counted with: $FSYNC_COUNTER"

# start_state_broker NAME TAG MODE PORT: starts NAME on 127.0.0.1:PORT with its state in
# $WORK/TAG (kept across restarts); sets BROKER_PID, BROKER_LOG and, for Heartwire, HTTP_PORT.
# Does not wait for it to accept.
start_state_broker() {
  local name="$1" tag="$2" mode="$3" port="$4"
  BROKER_LOG="$WORK/$tag.log"
  mkdir -p "$WORK/$tag"
  case "$name" in
    heartwire)
      HTTP_PORT="$(free_port)"
      (cd "$WORK/$tag" && \
        BROKER_MQTT__LISTEN="127.0.0.1:$port" BROKER_HTTP__LISTEN="127.0.0.1:$HTTP_PORT" \
        BROKER_PERSISTENCE__MODE="$mode" BROKER_PERSISTENCE__DIR="$WORK/$tag/state" RUST_LOG=warn \
        exec "${BROKER_PIN[@]}" "$HEARTWIRE") >>"$BROKER_LOG" 2>&1 &
      ;;
    mosquitto)
      cat >"$WORK/$tag.conf" <<EOF
listener $port 127.0.0.1
allow_anonymous true
user $(id -un)
persistence true
persistence_location $WORK/$tag/
log_dest stderr
log_type error
log_type warning
${MOSQUITTO_EXTRA_CONF:-}
EOF
      "${BROKER_PIN[@]}" "$MOSQUITTO" -c "$WORK/$tag.conf" >>"$BROKER_LOG" 2>&1 &
      ;;
  esac
  BROKER_PID=$!
  PIDS+=("$BROKER_PID")
}

# start_fresh NAME TAG MODE: a fresh broker on a free port, waited for (with retries, as
# start_broker); sets BROKER_PORT too.
start_fresh() {
  local name="$1" tag="$2" mode="$3" attempt
  for attempt in 1 2 3 4 5; do
    BROKER_PORT="$(free_port)"
    rm -rf "${WORK:?}/$tag"
    start_state_broker "$name" "$tag" "$mode" "$BROKER_PORT"
    if wait_tcp "$BROKER_PORT" "$BROKER_PID" "$name"; then return 0; fi
    wait "$BROKER_PID" 2>/dev/null || true
    log "$name exited during startup on port $BROKER_PORT (attempt $attempt): $(tail -n 1 "$BROKER_LOG")"
  done
  die "$name failed to start 5 times (see $BROKER_LOG)"
}

# metric NAME: a value from Heartwire's /metrics ("-" if unreadable).
metric() {
  local v
  v="$(curl -s --max-time 5 "http://127.0.0.1:$HTTP_PORT/metrics" | awk -v k="$1" '$1 == k { print $2 }')"
  printf '%s' "${v:--}"
}

write_bytes() { awk '$1 == "write_bytes:" { print $2 }' "/proc/$1/io" 2>/dev/null || echo -; }

# fsync_counter_start PID FILE / fsync_counter_stop FILE -> prints the count ("n/a").
COUNTER_PID=""
fsync_counter_start() {
  local pid="$1" out="$2"
  case "$FSYNC_COUNTER" in
    perf) perf stat -x, -e syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync -p "$pid" -o "$out" & ;;
    strace) strace -f -c -e trace=fsync,fdatasync -p "$pid" -o "$out" 2>/dev/null & ;;
    none) COUNTER_PID=""; return ;;
  esac
  COUNTER_PID=$!
  PIDS+=("$COUNTER_PID")
  sleep 0.5   # attached before the load starts
}
fsync_counter_stop() {
  local out="$1"
  [[ -z "$COUNTER_PID" ]] && { printf 'n/a'; return; }
  stop_pid "$COUNTER_PID" INT
  case "$FSYNC_COUNTER" in
    perf) awk -F, '$3 ~ /sys_enter_f(data)?sync/ { n += $1 } END { print n + 0 }' "$out" ;;
    strace) awk '$NF == "fsync" || $NF == "fdatasync" { n += $4 } END { print n + 0 }' "$out" ;;
  esac
}

# per A B: A / B with the given decimals, "-" unless both are numbers.
per() {
  awk -v a="$1" -v b="$2" -v d="${3:-2}" 'BEGIN {
    if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b + 0 > 0) printf "%.*f", d, a / b; else printf "-" }'
}
sub() { awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/) printf "%d", a - b; else printf "-" }'; }

MOSQUITTO_VERSION="$("$MOSQUITTO" -h 2>/dev/null | head -n 1 | awk '{ print $3 }' || true)"
label() { if [[ "$1" == heartwire ]]; then echo Heartwire; else echo "Mosquitto ${MOSQUITTO_VERSION}"; fi; }

# --- part 1: QoS 1 to persistent sessions ---------------------------------------------------
declare -A PUB
publish_run() {
  local name="$1" mode="$2" tag="pub-$1-$2" line f0 f1 w0 w1 c0 c1 s0 s1 syscalls acked
  log "== $name persistence=$mode: $PUBLISHERS publishers (window $WINDOW) -> $SUBSCRIBERS persistent subscribers$( (( OFFLINE )) && echo ' (offline)'), load average $(machine_load)"
  start_fresh "$name" "$tag" "$mode"
  f0=-; c0=-; s0=-
  if [[ "$name" == heartwire ]]; then
    f0="$(metric heartwire_state_fsyncs_total)"
    c0="$(metric heartwire_state_commit_records_sum)"; s0="$(metric heartwire_state_commit_records_count)"
  fi
  w0="$(write_bytes "$BROKER_PID")"
  fsync_counter_start "$BROKER_PID" "$WORK/$tag.fsyncs"
  line="$(loadgen "$tag" "$PUBLISH_TIMEOUT" persistent-publish --publishers "$PUBLISHERS" \
      --subscribers "$SUBSCRIBERS" "${OFFLINE_ARGS[@]}" --window "$WINDOW" \
      --payload-size "$PAYLOAD_SIZE" --warmup "$WARMUP" --duration "$DURATION")"
  syscalls="$(fsync_counter_stop "$WORK/$tag.fsyncs")"
  w1="$(write_bytes "$BROKER_PID")"
  f1=-; c1=-; s1=-
  if [[ "$name" == heartwire ]]; then
    f1="$(metric heartwire_state_fsyncs_total)"
    c1="$(metric heartwire_state_commit_records_sum)"; s1="$(metric heartwire_state_commit_records_count)"
  fi
  kill -0 "$BROKER_PID" 2>/dev/null || log "  $name exited during the run (see $BROKER_LOG)"
  stop_pid "$BROKER_PID" TERM
  acked="$(field acked_total "$line")"
  PUB["$name|$mode"]="$line fsyncs_metric=$(sub "$f1" "$f0") fsyncs_syscalls=$syscalls write_bytes=$(sub "$w1" "$w0") records_per_commit=$(per "$(sub "$c1" "$c0")" "$(sub "$s1" "$s0")" 1) acked=$acked"
}

# --- part 2: restart with state -------------------------------------------------------------
declare -A RESTART
restart_run() {
  local name="$1" tag="restart-$1" fill resume t0 t1 stop_s disk load_s=- start_ns port
  log "== $name: filling $SESSIONS sessions x $QUEUED queued messages, load average $(machine_load)"
  start_fresh "$name" "$tag" sync
  port="$BROKER_PORT"
  fill="$(loadgen "$tag-fill" "$FILL_TIMEOUT" persistent-fill --sessions "$SESSIONS" \
      --queued "$QUEUED" --payload-size "$PAYLOAD_SIZE")"
  kill -0 "$BROKER_PID" 2>/dev/null || log "  $name exited during the fill (see $BROKER_LOG)"
  t0="$(date +%s%N)"
  stop_pid "$BROKER_PID" TERM
  t1="$(date +%s%N)"
  stop_s="$(per "$(( t1 - t0 ))" 1000000000 2)"
  # Heartwire's state directory (its presence store lies beside it), Mosquitto's mosquitto.db.
  if [[ "$name" == heartwire ]]; then disk="$WORK/$tag/state"; else disk="$WORK/$tag"; fi
  disk="$(du -sb "$disk" | awk '{ print $1 }')"
  log "  stopped in ${stop_s}s; state on disk: $disk bytes; starting again"
  start_ns="$(date +%s%N)"
  start_state_broker "$name" "$tag" sync "$port"
  resume="$(loadgen "$tag-resume" "$RESUME_TIMEOUT" persistent-resume --since-ns "$start_ns" \
      --expect "$QUEUED")"
  [[ "$name" == heartwire ]] && load_s="$(per "$(metric heartwire_state_load_seconds)" 1 3)"
  kill -0 "$BROKER_PID" 2>/dev/null || log "  $name exited after the restart (see $BROKER_LOG)"
  stop_pid "$BROKER_PID" TERM
  RESTART["$name"]="$fill $resume stop_s=$stop_s disk_bytes=$disk load_s=$load_s"
}

for part in $PARTS; do
  for b in $BROKERS; do
    case "$part" in
      publish)
        if [[ "$b" == heartwire ]]; then
          for m in $MODES; do publish_run heartwire "$m"; done
        else
          publish_run mosquitto autosave
        fi
        ;;
      restart) restart_run "$b" ;;
    esac
  done
done

# --- report ---------------------------------------------------------------------------------
echo
echo "Durable state, $(nproc) cores, CORES=$CORES, load average $(machine_load); fsync calls counted with $FSYNC_COUNTER"
if [[ " $PARTS " == *" publish "* ]]; then
  echo
  echo "1. QoS 1 to persistent sessions: $PUBLISHERS publishers, $WINDOW messages in flight each, ${PAYLOAD_SIZE}-byte payload -> $SUBSCRIBERS persistent subscribers ($( (( OFFLINE )) && echo offline || echo online), QoS 1); warm-up ${WARMUP}s, window ${DURATION}s"
  fmt='%-18s| %-12s| %12s | %12s | %14s | %23s | %20s | %15s | %10s | %21s\n'
  # shellcheck disable=SC2059
  printf "$fmt" broker persistence "acked msg/s" "broker CPU %" "CPU s/1000 msg" "fsyncs/msg (metric: n)" "fsync calls/msg (n)" "records/commit" "disk B/msg" "acked / delivered"
  rows=()
  for b in $BROKERS; do
    if [[ "$b" == heartwire ]]; then for m in $MODES; do rows+=("heartwire|$m"); done
    else rows+=("mosquitto|autosave"); fi
  done
  for r in "${rows[@]}"; do
    line="${PUB[$r]}"
    if [[ "$line" != persistent-publish* ]]; then
      echo "$(label "${r%%|*}") ${r#*|} | $line"
      continue
    fi
    acked="$(field acked "$line")"
    metric_per="$(per "$(field fsyncs_metric "$line")" "$acked" 4) ($(field fsyncs_metric "$line"))"
    [[ "${r%%|*}" == mosquitto ]] && metric_per="n/a"
    calls_per="$(per "$(field fsyncs_syscalls "$line")" "$acked" 4) ($(field fsyncs_syscalls "$line"))"
    [[ "$(field fsyncs_syscalls "$line")" == n/a ]] && calls_per="n/a"
    # shellcheck disable=SC2059
    printf "$fmt" "$(label "${r%%|*}")" "${r#*|}" "$(field acked_per_s "$line")" "$(field broker_cpu_pct "$line")" \
      "$(field broker_cpu_s_per_1000 "$line")" "$metric_per" "$calls_per" \
      "$(field records_per_commit "$line")" "$(per "$(field write_bytes "$line")" "$acked" 0)" \
      "$acked / $(field delivered_total "$line")"
  done
  echo "acked msg/s and CPU: over the window; fsyncs, fsync calls (fsync + fdatasync system calls of the"
  echo "broker process) and disk bytes (/proc/PID/io write_bytes): over the whole run, per acknowledged"
  echo "message (the count in parentheses); records/commit: heartwire_state_commit_records, records per"
  echo "write of the writer thread (sync: per fsync). Mosquitto acknowledges a QoS 1 PUBLISH without"
  echo "writing it to disk: it saves its state at autosave_interval (1800 s) and at shutdown, so an"
  echo "acknowledged message is not durable there."
fi
if [[ " $PARTS " == *" restart "* ]]; then
  echo
  echo "2. Restart with state: $SESSIONS persistent sessions x $QUEUED queued QoS 1 messages (${PAYLOAD_SIZE}-byte payload); Heartwire persistence.mode sync"
  fmt='%-18s| %11s | %13s | %14s | %8s | %9s | %13s | %10s | %12s | %14s | %12s | %16s\n'
  # shellcheck disable=SC2059
  printf "$fmt" broker "sessions s" "queue msg/s" "RSS filled MB" "stop s" "state MB" "TCP connect s" "CONNACK s" "first msg s" "all $QUEUED msgs s" "RSS after MB" "Heartwire load s"
  for b in $BROKERS; do
    line="${RESTART[$b]:-}"
    if [[ "$line" != persistent-fill* ]]; then
      echo "$(label "$b") | ${line:-not run}"
      continue
    fi
    # The fill's and the resume's fields share names (rss_kib): each is read from its own part.
    fill_part="${line%% persistent-resume*}"
    resume_part="persistent-resume${line#* persistent-resume}"
    # shellcheck disable=SC2059
    printf "$fmt" "$(label "$b")" "$(field sessions_s "$fill_part")" "$(field acked_per_s "$fill_part")" \
      "$(kib_to_mib "$(field rss_kib "$fill_part")")" "$(field stop_s "$line")" \
      "$(per "$(field disk_bytes "$line")" 1048576 1)" "$(field accepted_s "$resume_part")" \
      "$(field connack_s "$resume_part")" \
      "$(field first_message_s "$resume_part")" "$(field all_received_s "$resume_part")" \
      "$(kib_to_mib "$(field rss_kib "$resume_part")")" "$(field load_s "$line")"
  done
  echo "sessions s: creating the sessions (connect, subscribe, disconnect; 100 at a time); queue msg/s:"
  echo "PUBACKs per second while queueing; stop s: SIGTERM to exit; TCP connect s, CONNACK s, first msg s,"
  echo "all msgs s: from the restart's exec to the first TCP connect that succeeds, and to the CONNACK"
  echo "and the first and last queued message of session ps-0 (resumed with clean session 0); RSS after:"
  echo "then. Heartwire binds its listeners before it loads the state (the kernel completes TCP"
  echo "handshakes meanwhile) and answers CONNECTs once loaded; Mosquitto loads, then listens."
fi
