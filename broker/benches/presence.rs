//! Presence pipeline benchmark against a real PostgreSQL (TEST_DATABASE_URL, or a throwaway
//! cluster from the local PostgreSQL binaries, as in the tests).
//!
//! 1. Throughput: events pushed into the bridge as fast as possible, committed in batches of
//!    `bridge.batch_size` (1000), next to the same bridge with batches of one event (one
//!    transaction per event). Printed side by side, in transitions per second.
//! 2. Latency: events paced at 5,000 per second for 10 s through the default bridge; the
//!    event-to-commit latency percentiles (from the bridge's histogram, so bounded by its bucket
//!    edges).
//!
//! Run: `cargo bench -p broker --bench presence` (env BATCHED=200000 UNBATCHED=10000 RATE=5000
//! SECONDS=10 to change the sizes).

use std::time::{Duration, Instant, SystemTime};

use broker::config::BridgeConfig;
use broker::event::{self, ConnectionEvent, SessionId};
use broker::labels::{DisconnectReason, Listener};
use broker::metrics::metrics;
use broker::presence::bridge::Bridge;
use broker::store::{PgStore, PresenceStore};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Events for `n / 2` sessions: each connects, then disconnects.
fn events(n: u64, prefix: &str) -> Vec<ConnectionEvent> {
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n / 2 {
        let session_id = SessionId::new();
        let client_id = format!("{prefix}-{}", i % 50_000);
        out.push(ConnectionEvent::Connected {
            protocol: Default::default(),
            client_id: client_id.clone(),
            session_id,
            seq: i,
            peer: "127.0.0.1:40000".parse().expect("addr"),
            listener: Listener::Tcp,
            identity: None,
            username: None,
            auth_method: broker::labels::AuthMethod::Anonymous,
            keep_alive: 30,
            clean_session: true,
            time: SystemTime::now(),
        });
        out.push(ConnectionEvent::Disconnected {
            reason_code: None,
            reason_string: None,
            session_expires_at: None,
            client_id,
            session_id,
            seq: i,
            reason: DisconnectReason::ConnectionLost,
            time: SystemTime::now(),
        });
    }
    out
}

fn restamp(event: &mut ConnectionEvent) {
    match event {
        ConnectionEvent::Connected { time, .. }
        | ConnectionEvent::Disconnected { time, .. }
        | ConnectionEvent::SessionExpired { time, .. } => *time = SystemTime::now(),
    }
}

fn bridge_config(dir: &std::path::Path, batch_size: usize) -> BridgeConfig {
    BridgeConfig {
        batch_size,
        memory_capacity: 1_000_000,
        // The channel closes right after the last event: wait for every commit.
        drain_timeout: Duration::from_secs(600),
        journal_path: dir.join(format!("journal-{batch_size}")),
        ..BridgeConfig::default()
    }
}

/// Pushes `events` through a bridge with `batch_size`; returns committed events per second.
async fn throughput(
    store: &PgStore,
    dir: &std::path::Path,
    batch_size: usize,
    mut events: Vec<ConnectionEvent>,
) -> f64 {
    let n = events.len() as u64;
    let (tx, rx) = event::channel(8192);
    let bridge = Bridge::new(
        store.clone(),
        rx,
        bridge_config(dir, batch_size),
        "bench",
        uuid::Uuid::now_v7(),
    )
    .await
    .expect("bridge");
    let before = metrics().bridge_persisted.get();
    let task = tokio::spawn(bridge.run(tokio_util::sync::CancellationToken::new()));
    let start = Instant::now();
    for mut event in events.drain(..) {
        restamp(&mut event);
        tx.send(event).await.expect("bridge alive");
    }
    drop(tx);
    task.await.expect("bridge");
    let elapsed = start.elapsed();
    let done = metrics().bridge_persisted.get() - before;
    assert_eq!(done, n, "every event committed");
    n as f64 / elapsed.as_secs_f64()
}

/// The bridge's commit-latency histogram: (upper bound, cumulative count) per bucket.
fn latency_buckets() -> Vec<(f64, u64)> {
    metrics()
        .registry
        .gather()
        .into_iter()
        .find(|f| f.get_name() == "heartwire_bridge_commit_latency_seconds")
        .map(|f| {
            f.get_metric()[0]
                .get_histogram()
                .get_bucket()
                .iter()
                .map(|b| (b.get_upper_bound(), b.get_cumulative_count()))
                .collect()
        })
        .unwrap_or_default()
}

/// Quantile `q` of the samples added between two snapshots (the upper bound of its bucket).
fn quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> f64 {
    let counts: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|(a, b)| (a.0, a.1 - b.1))
        .collect();
    let total = counts.last().map_or(0, |c| c.1) as f64;
    counts
        .iter()
        .find(|(_, cumulative)| *cumulative as f64 >= q * total)
        .map_or(f64::INFINITY, |(bound, _)| *bound)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let batched_n = env("BATCHED", 200_000);
        let unbatched_n = env("UNBATCHED", 10_000);
        let rate = env("RATE", 5_000);
        let seconds = env("SECONDS", 10);

        let pg = testkit::pg::TestPostgres::start().await;
        if pg.controls_server() {
            // The test cluster trades durability for speed; measure with production settings.
            let pool = sqlx::PgPool::connect(pg.url()).await.expect("connect");
            for setting in ["fsync", "synchronous_commit", "full_page_writes"] {
                sqlx::query(&format!("ALTER SYSTEM SET {setting} = on"))
                    .execute(&pool)
                    .await
                    .expect("alter system");
            }
            // PostgreSQL's default buffer pool (the harness runs with 16 MB); needs a restart.
            sqlx::query("ALTER SYSTEM SET shared_buffers = '128MB'")
                .execute(&pool)
                .await
                .expect("alter system");
            pool.close().await;
            pg.stop_server().await.expect("stop");
            pg.start_server().await.expect("start");
        }
        let store = PgStore::connect(pg.url(), 4)
            .await
            .expect("connect")
            .coalescing(BridgeConfig::default().coalesce_after);
        store.migrate().await.expect("migrate");
        let dir =
            std::env::temp_dir().join(format!("heartwire-bench-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("dir");

        println!(
            "presence store benchmark: PostgreSQL (fsync, synchronous_commit, full_page_writes on, \
             shared_buffers 128MB), 2 tokio workers"
        );
        {
            let batch: Vec<_> = events(1000, "probe")
                .into_iter()
                .map(|event| broker::event::PresenceRecord {
                    node_id: "bench".into(),
                    boot_id: uuid::Uuid::now_v7(),
                    event,
                })
                .collect();
            let t = Instant::now();
            store.apply(&batch).await.expect("apply");
            println!(
                "one batch of 1000 events applied directly: {:?}",
                t.elapsed()
            );
        }
        let batched = throughput(&store, &dir, 1000, events(batched_n, "b")).await;
        let unbatched = throughput(&store, &dir, 1, events(unbatched_n, "u")).await;
        println!("{:<34} {:>12} {:>16}", "mode", "events", "transitions/s");
        println!(
            "{:<34} {:>12} {:>16.0}",
            "batched (1000 per transaction)", batched_n, batched
        );
        println!(
            "{:<34} {:>12} {:>16.0}",
            "one transaction per event", unbatched_n, unbatched
        );
        println!("speed-up: {:.1}x", batched / unbatched);

        // Latency at a steady rate, through the default bridge configuration.
        let latency_before = latency_buckets();
        let (tx, rx) = event::channel(8192);
        let config = BridgeConfig {
            journal_path: dir.join("journal-latency"),
            ..BridgeConfig::default()
        };
        let bridge = Bridge::new(store.clone(), rx, config, "bench", uuid::Uuid::now_v7())
            .await
            .expect("bridge");
        let task = tokio::spawn(bridge.run(tokio_util::sync::CancellationToken::new()));
        let all = events(rate * seconds, "l");
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let per_tick = (rate / 100) as usize;
        let started = Instant::now();
        for chunk in all.chunks(per_tick.max(1)) {
            tick.tick().await;
            for event in chunk {
                let mut event = event.clone();
                restamp(&mut event);
                tx.send(event).await.expect("bridge alive");
            }
        }
        let sent_in = started.elapsed();
        drop(tx);
        task.await.expect("bridge");
        let latency_after = latency_buckets();
        let measured =
            latency_after.last().map_or(0, |b| b.1) - latency_before.last().map_or(0, |b| b.1);
        println!(
            "latency at {rate}/s for {:.1} s ({measured} events): event-to-commit \
             p50 <= {:.3} s, p99 <= {:.3} s, max <= {:.3} s (histogram bucket bounds)",
            sent_in.as_secs_f64(),
            quantile(&latency_before, &latency_after, 0.50),
            quantile(&latency_before, &latency_after, 0.99),
            quantile(&latency_before, &latency_after, 1.0),
        );
        let _ = std::fs::remove_dir_all(&dir);
    });
}
