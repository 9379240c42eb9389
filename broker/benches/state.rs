//! Broker state benchmark: restart time with a large state, and group commit under many
//! concurrent publishers.
//!
//! 1. Restart: writes the state of `SESSIONS` persistent sessions (100,000) with `QUEUED`
//!    messages each (10: 1,000,000 in all, 100-byte payloads) and `RETAINED` retained
//!    messages (10,000) through the embedded engine, closes it, then times what a start does
//!    before serving: reading the state back (`state::open`: snapshot and logs) and rebuilding
//!    sessions, subscriptions, queues and retained messages (`Broker::restore`). Prints both,
//!    the bytes on disk and the process's resident memory before and after.
//! 2. Group commit: `PRODUCERS` threads (64) each append a queued-message record and wait until
//!    it is durable, for `SECONDS` (5): durable records per second, fsyncs per second and
//!    records per fsync, with the default 2 ms commit window and with none.
//!
//! Run: `cargo bench -p broker --bench state` (env SESSIONS, QUEUED, RETAINED, PRODUCERS,
//! SECONDS to change the sizes; DIR for the directory, a temporary one by default).

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::config::{MqttConfig, PersistenceConfig};
use broker::metrics::metrics;
use broker::state::{self, Record, StateStore, StoredDelivery, StoredMessage, StoredOptions};
use bytes::Bytes;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident memory of this process, in MiB.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn message(topic: String, size: usize) -> StoredMessage {
    StoredMessage {
        topic: topic.into(),
        payload: Bytes::from(vec![b'x'; size]),
        qos: 1,
        retain: false,
        properties: None,
    }
}

fn delivery() -> StoredDelivery {
    StoredDelivery {
        qos: 1,
        retain: false,
        ids: None,
        shared: None,
    }
}

/// Appends `records` and waits until the last is durable.
fn durably(store: &dyn StateStore, records: impl IntoIterator<Item = Record>) {
    let mut last = 0;
    for r in records {
        last = store.append(r);
    }
    while store
        .poll_durable(last, std::task::Waker::noop())
        .is_pending()
    {
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn config(dir: &std::path::Path, window: Duration) -> PersistenceConfig {
    PersistenceConfig {
        dir: dir.to_owned(),
        commit_window: window,
        max_disk: 0,
        ..PersistenceConfig::default()
    }
}

fn disk_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn restart(dir: &std::path::Path) {
    let sessions = env("SESSIONS", 100_000);
    let queued = env("QUEUED", 10);
    let retained = env("RETAINED", 10_000);
    println!(
        "Restart with {sessions} persistent sessions x {queued} queued messages \
         ({} in all) and {retained} retained messages",
        sessions * queued
    );
    let started = Instant::now();
    {
        let (store, _) = state::open(&config(dir, Duration::from_millis(2)))
            .expect("open")
            .expect("persistence on");
        let mut id = 0;
        for key in 1..=sessions {
            let mut batch = vec![
                Record::Session {
                    key,
                    client_id: format!("device-{key:06}").into(),
                    expiry: None,
                    access: None,
                },
                Record::Subscribe {
                    key,
                    filter: format!("devices/{key:06}/cmd/#").into(),
                    options: StoredOptions {
                        qos: 1,
                        no_local: false,
                        retain_as_published: false,
                        id: 0,
                    },
                },
            ];
            for _ in 0..queued {
                id += 1;
                batch.push(Record::Message {
                    id,
                    message: message(format!("devices/{key:06}/cmd/set"), 100),
                });
                batch.push(Record::Enqueue {
                    key,
                    id,
                    delivery: delivery(),
                });
            }
            batch.push(Record::Left { key, at_ms: 0 });
            if key % 1000 == 0 || key == sessions {
                durably(&*store, batch);
            } else {
                for r in batch {
                    store.append(r);
                }
            }
        }
        durably(
            &*store,
            (1..=retained).map(|i| Record::Retain {
                topic: format!("devices/{i:06}/state").into(),
                message: Some(message(format!("devices/{i:06}/state"), 100)),
            }),
        );
        store.close();
    }
    println!(
        "  written and durable in {:.2} s; {:.0} MiB of state, {:.0} MiB of files (with the \
         spare log and the zeros of the log grown ahead)",
        started.elapsed().as_secs_f64(),
        metrics().state_disk_bytes.get() as f64 / 1048576.0,
        disk_bytes(dir) as f64 / 1048576.0
    );

    let rss_before = rss_mib();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let started = Instant::now();
        let (store, loaded) = state::open(&config(dir, Duration::from_millis(2)))
            .expect("open")
            .expect("persistence on");
        let read = started.elapsed();
        let (events, _receiver) = broker::event::channel(16);
        let mut mqtt = broker::mqtt::Broker::new(
            MqttConfig {
                max_queued_bytes_total: usize::MAX / 2,
                ..MqttConfig::default()
            },
            events,
        );
        mqtt.set_state(Arc::clone(&store));
        let restored = mqtt.restore(loaded.image);
        let total = started.elapsed();
        println!(
            "  start: read {:.0} MiB in {:.2} s, rebuilt {} sessions, {} queued messages and \
             {} retained messages in {:.2} s more: serving after {:.2} s",
            loaded.read_bytes as f64 / 1048576.0,
            read.as_secs_f64(),
            restored.sessions,
            restored.messages,
            restored.retained,
            (total - read).as_secs_f64(),
            total.as_secs_f64()
        );
        println!(
            "  resident memory: {rss_before:.0} MiB before, {:.0} MiB after",
            rss_mib()
        );
        drop(mqtt);
        store.close();
    });
}

fn group_commit(dir: &std::path::Path, window: Duration) {
    let producers = env("PRODUCERS", 64);
    let seconds = env("SECONDS", 5);
    let _ = std::fs::remove_dir_all(dir);
    let (store, _) = state::open(&config(dir, window))
        .expect("open")
        .expect("persistence on");
    let m = metrics();
    let fsyncs_before = m.state_fsyncs.get();
    let until = Instant::now() + Duration::from_secs(seconds);
    let threads: Vec<_> = (0..producers)
        .map(|p| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < until {
                    let id = store.next_message_id();
                    durably(
                        &*store,
                        [
                            Record::Message {
                                id,
                                message: message(format!("t/{p}"), 64),
                            },
                            Record::Enqueue {
                                key: p + 1,
                                id,
                                delivery: delivery(),
                            },
                        ],
                    );
                    n += 1;
                }
                n
            })
        })
        .collect();
    let messages: u64 = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    let fsyncs = m.state_fsyncs.get() - fsyncs_before;
    println!(
        "Group commit, {producers} publishers each waiting for durability, commit window {window:?}: \
         {:.0} durable messages/s, {:.0} fsyncs/s, {:.1} messages per fsync",
        messages as f64 / seconds as f64,
        fsyncs as f64 / seconds as f64,
        messages as f64 / fsyncs.max(1) as f64
    );
    store.close();
}

fn main() {
    let temp = tempfile::tempdir().expect("tempdir");
    let dir = std::env::var_os("DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| temp.path().to_owned());
    restart(&dir.join("restart"));
    group_commit(&dir.join("commit"), Duration::from_millis(2));
    group_commit(&dir.join("commit0"), Duration::ZERO);
}
