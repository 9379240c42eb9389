# The Heartwire image: the broker (the entrypoint) and device-sim, built from this workspace.
#
#   docker build -t heartwire:local .
#   docker run --rm -p 1883:1883 -p 8080:8080 heartwire:local        # presence in SQLite, ./data
#   docker run --rm --entrypoint device-sim heartwire:local run --help
#   docker run --rm --entrypoint heartwire-dev-certs heartwire:local --help
#
# docker-compose.yml builds it and runs it with PostgreSQL, Prometheus and Grafana.

FROM rust:1-bookworm AS builder
WORKDIR /src
# The workspace manifest and lock file, every member (broker/benches too: its Cargo.toml declares
# the bench target; testkit is only a dev-dependency, but cargo loads every member's manifest),
# and the migrations that sqlx::migrate! embeds at compile time from
# broker/src/store/{postgres,sqlite}.rs ("../migrations/..."). bench/rumqttd and bench/loadgen
# are excluded from the workspace and not needed.
COPY Cargo.toml Cargo.lock ./
COPY broker ./broker
COPY device-sim ./device-sim
COPY testkit ./testkit
COPY migrations ./migrations
# Cache mounts keep the registry and the build directory between builds (BuildKit, the default
# builder); the binaries are copied out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p broker -p device-sim \
 && mkdir -p /out \
 && cp target/release/broker target/release/device-sim /out/

FROM debian:bookworm-slim
# openssl: heartwire-dev-certs (scripts/dev-certs.sh), which the compose stack's one-shot `certs`
# service runs to make the TLS listener's throwaway CA and certificate. /etc/heartwire/tls is
# where it writes them: owned by the broker's user, so a new volume mounted there is too.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates openssl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 heartwire \
 && useradd --system --uid 10001 --gid heartwire --home-dir /var/lib/heartwire \
        --shell /usr/sbin/nologin heartwire \
 && install -d -o heartwire -g heartwire -m 0750 /var/lib/heartwire /etc/heartwire/tls
COPY --from=builder /out/broker /out/device-sim /usr/local/bin/
COPY --chmod=0755 scripts/dev-certs.sh /usr/local/bin/heartwire-dev-certs
USER heartwire
# The broker's relative paths land here: data/broker.db (the default SQLite store) and
# data/presence.journal (bridge.journal_path). Mount a volume on this directory to keep them.
WORKDIR /var/lib/heartwire
# MQTT; MQTT over TLS, WebSocket and WebSocket over TLS (when configured: mqtt.tls.listen,
# mqtt.ws.listen, mqtt.wss.listen); HTTP (REST API, /metrics, /healthz, /readyz).
EXPOSE 1883 8883 8083 8084 8080
ENTRYPOINT ["broker"]
