# shellcheck shell=bash
# Shared by bench/fan-in.sh and bench/retained-subscribe.sh (sourced after bench/lib.sh, not
# run): the prerequisites of a loadgen side-by-side run, and starting Heartwire or Mosquitto on
# a free loopback port, optionally pinned to CPU cores.
#
# Before sourcing, set BROKERS, CORES and BROKER_START_TIMEOUT (seconds until a broker must
# accept TCP); call bench_setup first. loadgen_prerequisites sets MOSQUITTO, HEARTWIRE,
# LOADGEN, BROKER_PIN and LOADGEN_PIN (taskset prefixes, empty with CORES=2). Heartwire gets
# the BROKER_* variables of the environment; MOSQUITTO_EXTRA_CONF, when set, holds lines added
# to Mosquitto's generated configuration (an acl_file, a password_file).

# loadgen_prerequisites: checks BROKERS and CORES, installs mosquitto if needed, builds the
# release broker (unless HEARTWIRE_BIN is given) and bench/loadgen.
# shellcheck disable=SC2034  # LOADGEN and LOADGEN_PIN are for the scripts that source this
loadgen_prerequisites() {
  local b
  for b in $BROKERS; do
    case "$b" in heartwire|mosquitto) ;; *) die "unknown broker '$b' in BROKERS (heartwire, mosquitto)" ;; esac
  done
  command -v python3 >/dev/null || die "python3 is needed to pick free ports"
  command -v timeout >/dev/null || die "timeout (coreutils) is needed"
  case "$CORES" in
    1)
      command -v taskset >/dev/null || die "CORES=1 needs taskset (util-linux)"
      (( $(nproc) >= 2 )) || die "CORES=1 pins the broker and the generator to two different cores; this machine has $(nproc)"
      BROKER_PIN=(taskset -c 0)
      LOADGEN_PIN=(taskset -c 1)
      ;;
    2) BROKER_PIN=(); LOADGEN_PIN=() ;;
    *) die "CORES must be 1 (broker on core 0, generator on core 1) or 2 (both unpinned)" ;;
  esac

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
  log "building bench/loadgen (release)"
  # Its own target directory whatever CARGO_TARGET_DIR says: LOADGEN is looked for there.
  CARGO_TARGET_DIR="$ROOT/bench/loadgen/target" \
    cargo build --release --quiet --manifest-path "$ROOT/bench/loadgen/Cargo.toml"
  LOADGEN="$ROOT/bench/loadgen/target/release/loadgen"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

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

# start_broker NAME TAG -> sets BROKER_PID, BROKER_PORT, BROKER_LOG. A port reported free can
# be taken by another loopback connection before the broker binds it, so a broker that exits
# during startup gets a few retries.
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

# The broker is started through `taskset` (which execs it) or directly, so $! is its pid.
start_broker_once() {
  local name="$1" tag="$2"
  BROKER_PORT="$(free_port)"
  BROKER_LOG="$WORK/$tag.log"
  case "$name" in
    heartwire)
      # A fresh directory: the SQLite file and the journal start empty.
      mkdir -p "$WORK/$tag"
      (cd "$WORK/$tag" && \
        BROKER_MQTT__LISTEN="127.0.0.1:$BROKER_PORT" BROKER_HTTP__LISTEN="127.0.0.1:0" RUST_LOG=warn \
        exec "${BROKER_PIN[@]}" "$HEARTWIRE") >"$BROKER_LOG" 2>&1 &
      ;;
    mosquitto)
      # Defaults otherwise. "user" names the account mosquitto switches to when started as
      # root (it refuses to keep running as root unless that account is root); without root
      # the line is ignored. Logging goes to the log file, errors and warnings only.
      cat >"$WORK/$tag.conf" <<EOF
listener $BROKER_PORT 127.0.0.1
allow_anonymous true
user $(id -un)
log_dest stderr
log_type error
log_type warning
${MOSQUITTO_EXTRA_CONF:-}
EOF
      "${BROKER_PIN[@]}" "$MOSQUITTO" -c "$WORK/$tag.conf" >"$BROKER_LOG" 2>&1 &
      ;;
  esac
  BROKER_PID=$!
  PIDS+=("$BROKER_PID")
}

# field KEY LINE: value of KEY=VALUE in a space-separated line ("-" when absent).
field() {
  local v
  v="$(tr ' ' '\n' <<<"$2" | awk -F= -v k="$1" '$1 == k { print $2 }')"
  printf '%s' "${v:--}"
}

# kib_to_mib KIB: one decimal, "-" passes through.
kib_to_mib() {
  [[ "$1" =~ ^[0-9]+$ ]] || { printf '%s' "$1"; return; }
  awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'
}

machine_load() { cut -d ' ' -f 1-3 /proc/loadavg; }
