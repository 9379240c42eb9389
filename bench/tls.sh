#!/usr/bin/env bash
# Benchmark: MQTT over TLS, Heartwire vs Mosquitto, same run, same certificate, same load
# generator (bench/loadgen, rustls with ring, no session resumption: every connect is a full
# handshake).
#
# Once per run: a throwaway CA and a server certificate for localhost and 127.0.0.1 (openssl;
# ECDSA P-256 by default). For each broker, started on a free loopback port with a TLS listener
# on that certificate, and started afresh for each measurement:
#   1. idle: COUNT TLS connections (keep-alive 60 s, PINGREQs only), the broker's RSS before the
#      first and SETTLE seconds after the last: KiB per idle TLS connection;
#   2. connect rate: CONNECTS connections started at CONNECT_RATE per second (open loop), the
#      CONNACK latency of each from the start of its TCP connect (TLS handshake included),
#      p50/p99/max, and the broker's CPU per connect; the connections stay open until the last
#      is answered.
# A table follows.
#
# Heartwire gets its TLS listener from BROKER_MQTT__TLS__LISTEN, BROKER_MQTT__TLS__CERT_FILE and
# BROKER_MQTT__TLS__KEY_FILE (with MUTUAL=1 also BROKER_MQTT__TLS__CLIENT_CA_FILE and
# BROKER_MQTT__TLS__REQUIRE_CLIENT_CERT=true); a broker build without TLS refuses those keys,
# and its row of the table says so. Mosquitto gets the equivalent listener (cafile, certfile,
# keyfile, require_certificate, and set_tcp_nodelay: see MOSQUITTO_NODELAY).
#
# Environment (all optional):
#   COUNT=10000          idle TLS connections (one loadgen process, one broker: each needs a
#                        descriptor per connection, under the open-file limit)
#   SETTLE=5             seconds between the last idle connection and the RSS reading
#   CONNECTS=5000        connections of the connect-rate measurement
#   CONNECT_RATE=1000    connects started per second
#   KEY_TYPE=ec          ec (ECDSA P-256) or rsa (RSA 2048): the server's (and client's) key
#   MUTUAL=0             1: the brokers require a client certificate (signed by the same CA),
#                        which loadgen presents (one for all connections)
#   MOSQUITTO_NODELAY=1  1: Mosquitto sets TCP_NODELAY like Heartwire (set_tcp_nodelay true);
#                        0: Mosquitto's default, Nagle's algorithm on, which holds each TLS
#                        CONNACK behind the unacknowledged TLS 1.3 session tickets until the
#                        client's delayed ACK (about 40 ms on Linux)
#   CORES=1              1: broker pinned to core 0, loadgen to core 1 (taskset); 2: neither
#                        pinned (the generator's handshakes then compete with the broker's)
#   BROKERS="heartwire mosquitto"   which brokers to measure, in order
#   KEEP_WORK=1          keep the temporary directory with certificates, logs and JSON reports
#   HEARTWIRE_BIN=PATH   use this broker binary instead of building target/release/broker
# Any BROKER_* variables in the environment reach the Heartwire broker unchanged; the script
# sets the TLS keys above, BROKER_MQTT__LISTEN=127.0.0.1:0, BROKER_HTTP__LISTEN=127.0.0.1:0 and
# RUST_LOG=warn; the broker runs in a temporary directory, so its SQLite file starts empty.
#
# Needs openssl (Debian's openssl package), and root only to install mosquitto (apt-get) when
# it is missing. All traffic stays on loopback; every wait is bounded and all started processes
# are stopped on exit.
set -euo pipefail

COUNT="${COUNT:-10000}"
SETTLE="${SETTLE:-5}"
CONNECTS="${CONNECTS:-5000}"
CONNECT_RATE="${CONNECT_RATE:-1000}"
KEY_TYPE="${KEY_TYPE:-ec}"
MUTUAL="${MUTUAL:-0}"
MOSQUITTO_NODELAY="${MOSQUITTO_NODELAY:-1}"
CORES="${CORES:-1}"
BROKERS="${BROKERS:-heartwire mosquitto}"
KEEPALIVE=60
BROKER_START_TIMEOUT=20   # seconds until a broker must accept TCP
STOP_TIMEOUT=30           # seconds a process gets to exit after a signal

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BENCH_TAG=tls
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
# shellcheck source=bench/brokers.sh
source "$ROOT/bench/brokers.sh"

for v in COUNT SETTLE CONNECTS CONNECT_RATE; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number"
done
(( COUNT > 0 && CONNECTS > 0 && CONNECT_RATE > 0 )) || die "COUNT, CONNECTS and CONNECT_RATE must be positive"
case "$KEY_TYPE" in
  ec) NEWKEY=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1); KEY_LABEL="ECDSA P-256" ;;
  rsa) NEWKEY=(-newkey rsa:2048); KEY_LABEL="RSA 2048" ;;
  *) die "KEY_TYPE must be ec or rsa" ;;
esac
[[ "$MUTUAL" == 0 || "$MUTUAL" == 1 ]] || die "MUTUAL must be 0 or 1"
[[ "$MOSQUITTO_NODELAY" == 0 || "$MOSQUITTO_NODELAY" == 1 ]] || die "MOSQUITTO_NODELAY must be 0 or 1"
command -v openssl >/dev/null || die "openssl is needed to make the certificates (Debian package openssl)"
# Connections are held at most this long per step by loadgen itself; this outer bound covers a
# whole measurement.
IDLE_TIMEOUT=$(( COUNT / 50 + SETTLE + 120 ))
RATE_TIMEOUT=$(( CONNECTS / CONNECT_RATE + 120 ))

bench_setup tls-bench
loadgen_prerequisites
(( COUNT + 64 <= $(ulimit -n) )) || die "COUNT=$COUNT exceeds the open-file limit $(ulimit -n) of one loadgen process (and of each broker)"
(( CONNECTS + 64 <= $(ulimit -n) )) || die "CONNECTS=$CONNECTS exceeds the open-file limit $(ulimit -n)"

# --- certificates ---------------------------------------------------------------------------
# make_cert NAME SUBJECT EXTENSIONS: a key and a certificate signed by the CA.
make_cert() {
  local name="$1" subject="$2" ext="$3"
  openssl req -new "${NEWKEY[@]}" -nodes -keyout "$PKI/$name.key" -out "$PKI/$name.csr" \
    -subj "$subject" 2>>"$PKI/openssl.log"
  printf '%b' "$ext" >"$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -CAcreateserial -days 2 -out "$PKI/$name.crt" -extfile "$PKI/$name.ext" 2>>"$PKI/openssl.log"
}
PKI="$WORK/pki"
mkdir -p "$PKI"
openssl req -x509 "${NEWKEY[@]}" -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -days 2 \
  -subj "/CN=Heartwire bench CA" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>>"$PKI/openssl.log" \
  || die "openssl could not make the CA (see $PKI/openssl.log)"
make_cert server "/CN=localhost" \
  'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
  || die "openssl could not make the server certificate (see $PKI/openssl.log)"
LOADGEN_TLS=(--tls --cafile "$PKI/ca.crt" --tls-server-name localhost)
if [[ "$MUTUAL" == 1 ]]; then
  make_cert client "/CN=loadgen" \
    'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' \
    || die "openssl could not make the client certificate (see $PKI/openssl.log)"
  LOADGEN_TLS+=(--cert "$PKI/client.crt" --key "$PKI/client.key")
fi
chmod a+r "$PKI"/*  # Mosquitto started as root reads them as the account it switches to
log "certificates: $KEY_LABEL, server certificate for localhost and 127.0.0.1, mutual TLS: $MUTUAL"

# --- brokers with a TLS listener ------------------------------------------------------------
# wait_listener PORT PID: bounded wait until 127.0.0.1:PORT accepts. Returns 1 if PID exits
# first, 2 if the broker's log says it ignores the TLS keys (a Heartwire build without TLS
# listeners warns and starts without one); dies on timeout.
wait_listener() {
  local port="$1" pid="$2" i
  for (( i = 0; i < BROKER_START_TIMEOUT * 10; i++ )); do
    kill -0 "$pid" 2>/dev/null || return 1
    grep -q 'name no configuration key.*BROKER_MQTT__TLS__' "$BROKER_LOG" 2>/dev/null && return 2
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "broker pid $pid did not accept TCP on port $port within ${BROKER_START_TIMEOUT}s (see $BROKER_LOG)"
}

# start_tls_broker NAME TAG -> sets BROKER_PID, BROKER_PORT, BROKER_LOG; returns 1 when the
# broker does not come up (its log says why).
start_tls_broker() {
  local name="$1" tag="$2" attempt
  for attempt in 1 2 3; do
    BROKER_PORT="$(free_port)"
    BROKER_LOG="$WORK/$tag.log"
    case "$name" in
      heartwire)
        mkdir -p "$WORK/$tag"
        local mutual_env=()
        if [[ "$MUTUAL" == 1 ]]; then
          mutual_env=(BROKER_MQTT__TLS__CLIENT_CA_FILE="$PKI/ca.crt" BROKER_MQTT__TLS__REQUIRE_CLIENT_CERT=true)
        fi
        (cd "$WORK/$tag" && \
          exec env BROKER_MQTT__LISTEN="127.0.0.1:0" BROKER_HTTP__LISTEN="127.0.0.1:0" \
            BROKER_MQTT__TLS__LISTEN="127.0.0.1:$BROKER_PORT" \
            BROKER_MQTT__TLS__CERT_FILE="$PKI/server.crt" BROKER_MQTT__TLS__KEY_FILE="$PKI/server.key" \
            ${mutual_env[@]+"${mutual_env[@]}"} RUST_LOG=warn \
            "${BROKER_PIN[@]}" "$HEARTWIRE") >"$BROKER_LOG" 2>&1 &
        ;;
      mosquitto)
        cat >"$WORK/$tag.conf" <<EOF
listener $BROKER_PORT 127.0.0.1
cafile $PKI/ca.crt
certfile $PKI/server.crt
keyfile $PKI/server.key
require_certificate $([[ "$MUTUAL" == 1 ]] && echo true || echo false)
allow_anonymous true
max_keepalive 65535
set_tcp_nodelay $([[ "$MOSQUITTO_NODELAY" == 1 ]] && echo true || echo false)
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
    local waited=0
    wait_listener "$BROKER_PORT" "$BROKER_PID" || waited=$?
    (( waited == 0 )) && return 0
    if (( waited == 2 )); then
      stop_pid "$BROKER_PID" TERM
      echo "this build has no TLS listener: it ignores BROKER_MQTT__TLS__*" >>"$BROKER_LOG"
      return 1
    fi
    wait "$BROKER_PID" 2>/dev/null || true
    cp "$BROKER_LOG" "$BROKER_LOG.attempt$attempt"
    # Only a port taken in the meantime is worth another try.
    grep -qiE 'in use' "$BROKER_LOG" || return 1
  done
  return 1
}

# first_error LOG: the line of a broker log that says why it did not start.
first_error() {
  grep -m 1 -iE 'no TLS listener|error|unknown|invalid' "$1" 2>/dev/null || tail -n 1 "$1" 2>/dev/null || true
}

# run_loadgen NAME TAG TIMEOUT ARGS...: starts the broker, runs loadgen against it, stops the
# broker; sets LINE to loadgen's summary line or to a sentence saying what failed.
run_loadgen() {
  local name="$1" tag="$2" bound="$3" rc=0
  shift 3
  if ! start_tls_broker "$name" "$tag"; then
    LINE="did not start: $(first_error "$BROKER_LOG")"
    log "  $name $LINE"
    return 0
  fi
  LINE="$(timeout -k 5 "$bound" "${LOADGEN_PIN[@]}" "$LOADGEN" --host 127.0.0.1 --port "$BROKER_PORT" \
      --broker-pid "$BROKER_PID" --keepalive "$KEEPALIVE" --json "$WORK/$tag.json" \
      "${LOADGEN_TLS[@]}" "$@" 2>"$WORK/$tag.loadgen.err")" || rc=$?
  if (( rc != 0 )) || [[ -z "$LINE" ]]; then
    LINE="loadgen failed (exit $rc): $(tail -n 1 "$WORK/$tag.loadgen.err")"
  fi
  log "  $LINE"
  kill -0 "$BROKER_PID" 2>/dev/null || log "  $name exited during the run (see $BROKER_LOG)"
  stop_pid "$BROKER_PID" TERM
}

declare -A IDLE RATE
for b in $BROKERS; do
  log "== $b: idle, $COUNT TLS connections (CORES=$CORES, load average $(machine_load))"
  run_loadgen "$b" "$b-idle" "$IDLE_TIMEOUT" idle --connections "$COUNT" --settle "$SETTLE"
  IDLE["$b"]="$LINE"
  log "== $b: connect rate, $CONNECTS TLS connects at $CONNECT_RATE/s (load average $(machine_load))"
  run_loadgen "$b" "$b-rate" "$RATE_TIMEOUT" connect-rate --connections "$CONNECTS" --rate "$CONNECT_RATE"
  RATE["$b"]="$LINE"
done

# --- report ---------------------------------------------------------------------------------
echo
echo "MQTT over TLS ($KEY_LABEL certificate, mutual TLS: $MUTUAL, no session resumption, Mosquitto set_tcp_nodelay: $MOSQUITTO_NODELAY): $COUNT idle connections (settle ${SETTLE}s); $CONNECTS connects at $CONNECT_RATE/s; CORES=$CORES ($(nproc) cores, load average $(machine_load))"
fmt='%-10s | %11s | %22s | %18s | %12s | %11s | %14s | %14s | %14s | %15s | %16s | %13s\n'
# shellcheck disable=SC2059
printf "$fmt" broker "idle conns" "RSS before/after KiB" "KiB per idle conn" "connected" "connects/s" \
  "connack p50 ms" "connack p99 ms" "connack max ms" "CPU ms/connect" "listen overflows" "loadgen CPU %"
for b in $BROKERS; do
  idle="${IDLE[$b]}" rate="${RATE[$b]}"
  if [[ "$idle" != idle* ]]; then
    echo "$b | idle: $idle"
    idle=""
  fi
  if [[ "$rate" != connect-rate* ]]; then
    echo "$b | connect rate: $rate"
    rate=""
  fi
  [[ -z "$idle" && -z "$rate" ]] && continue
  # shellcheck disable=SC2059
  printf "$fmt" "$b" "$(field connected "$idle")" \
    "$(field rss_before_kib "$idle")/$(field rss_after_kib "$idle")" \
    "$(field kib_per_connection "$idle")" "$(field connected "$rate")/$CONNECTS" \
    "$(field achieved_per_s "$rate")" "$(field connack_p50_ms "$rate")" \
    "$(field connack_p99_ms "$rate")" "$(field connack_max_ms "$rate")" \
    "$(field broker_cpu_ms_per_connect "$rate")" "$(field listen_overflows "$rate")" \
    "$(field loadgen_cpu_pct "$rate")"
done
echo "KiB per idle conn: (RSS after - RSS before) / connections, from /proc/PID/status. connack: from"
echo "the start of the TCP connect to the CONNACK, TLS handshake included; CPU ms/connect: the"
echo "broker's user+system CPU over the connect phase / connections; listen overflows: SYNs or"
echo "handshake ACKs the kernel dropped from a full listen queue meanwhile (system-wide), each a"
echo "retransmission of a second or more for its client."
