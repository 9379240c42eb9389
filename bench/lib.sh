# shellcheck shell=bash
# Shared by the bench/ scripts (sourced, not run): logging, the processes a script starts and
# stops on exit, and locating (or installing) the brokers under comparison.
#
# Before sourcing, set BENCH_TAG (the log prefix) and STOP_TIMEOUT (seconds a process gets to
# exit after a signal). bench_setup NAME creates $WORK and installs the exit traps; everything
# started in the background goes into PIDS so that it is stopped on exit, however the script ends.

log() { printf '[%s] %s\n' "$BENCH_TAG" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$BENCH_TAG" "$*" >&2; exit 1; }

PIDS=()
WORK=""

# stop_pid PID SIGNAL: signal the process, wait (bounded) for it to exit, then SIGKILL.
stop_pid() {
  local pid="$1" sig="$2" i
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill "-$sig" "$pid" 2>/dev/null || true
  for (( i = 0; i < STOP_TIMEOUT * 10; i++ )); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid did not exit after SIG$sig within ${STOP_TIMEOUT}s; killing"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

bench_cleanup() {
  local rc=$? pid
  for pid in "${PIDS[@]}"; do stop_pid "$pid" TERM; done
  if [[ "${KEEP_WORK:-0}" == 1 || $rc -ne 0 ]]; then
    log "work directory (logs, configs) kept: $WORK"
  else
    rm -rf "$WORK"
  fi
}

# bench_setup NAME: the temporary work directory and the exit traps.
bench_setup() {
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")"
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# find_mosquitto: sets MOSQUITTO to Debian's mosquitto binary, installing the package (root or
# sudo) when it is missing.
find_mosquitto() {
  MOSQUITTO="$(command -v mosquitto || true)"
  [[ -z "$MOSQUITTO" && -x /usr/sbin/mosquitto ]] && MOSQUITTO=/usr/sbin/mosquitto
  if [[ -z "$MOSQUITTO" ]]; then
    log "installing mosquitto"
    local sudo=""
    if [[ "$(id -u)" -ne 0 ]]; then
      command -v sudo >/dev/null || die "mosquitto is missing and installing it needs root (or sudo)"
      sudo=sudo
    fi
    if ! $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto >"$WORK/apt.log" 2>&1; then
      $sudo apt-get update >>"$WORK/apt.log" 2>&1
      $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto >>"$WORK/apt.log" 2>&1 \
        || die "apt-get install mosquitto failed (see $WORK/apt.log)"
    fi
    MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
  fi
  [[ -x "$MOSQUITTO" ]] || die "mosquitto not found after install"
}

# heartwire_binary: sets HEARTWIRE to $HEARTWIRE_BIN as an absolute path, or to the release
# broker (the caller builds it), and checks that it is executable.
heartwire_binary() {
  HEARTWIRE="${HEARTWIRE_BIN:-$ROOT/target/release/broker}"
  HEARTWIRE="$(cd "$(dirname "$HEARTWIRE")" && pwd)/$(basename "$HEARTWIRE")"
  [[ -x "$HEARTWIRE" ]] || die "broker binary $HEARTWIRE is missing or not executable"
}

# loadgen TAG BOUND ARGS...: runs bench/loadgen ($LOADGEN, pinned by the LOADGEN_PIN array)
# against the broker at BROKER_PORT (pid BROKER_PID) for at most BOUND, its JSON in
# $WORK/TAG.json and its errors in $WORK/TAG.loadgen.err; prints its summary line, or
# "failed (exit N)" (logged) when it fails.
loadgen() {
  local tag="$1" bound="$2" line rc=0
  shift 2
  line="$(timeout -k 5 "$bound" "${LOADGEN_PIN[@]}" "$LOADGEN" \
      --host 127.0.0.1 --port "$BROKER_PORT" --broker-pid "$BROKER_PID" --json "$WORK/$tag.json" \
      "$@" 2>"$WORK/$tag.loadgen.err")" || rc=$?
  if (( rc != 0 )) || [[ -z "$line" ]]; then
    log "  loadgen failed (exit $rc): $(tail -n 3 "$WORK/$tag.loadgen.err")"
    line="failed (exit $rc)"
  else
    log "  $line"
  fi
  printf '%s' "$line"
}
