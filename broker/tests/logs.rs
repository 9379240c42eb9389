//! Log injection: strings that clients choose (client ids, topics, filters, will topics) reach
//! the log escaped in every log format, so a client can neither forge a log line nor send escape
//! sequences to an operator's terminal.

use std::io::Write;
use std::sync::{Arc, Mutex};

use broker::config::LogFormat;
use broker::labels::DisconnectReason;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use testkit::{ConnectOpts, RawClient, TestBroker};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Log output collected in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'w> MakeWriter<'w> for Captured {
    type Writer = Captured;
    fn make_writer(&'w self) -> Self::Writer {
        self.clone()
    }
}

/// A line break, then what would pass for a log line of its own, with colour and terminal-title
/// escape sequences.
const FORGED: &str =
    "\nFORGED 2026-11-29T00:00:00Z ERROR broker: \x1b[31mdatabase wiped\x1b[0m\x1b]0;owned\x07";

/// Each kind of client string that the broker logs at info level, sent by misbehaving clients.
async fn misbehave(broker: &mut TestBroker) {
    // A client id with control characters: refused with CONNACK 0x02, and logged.
    let id = format!("evil{FORGED}");
    let mut c = RawClient::tcp(broker.addr).await;
    c.send(&testkit::connect_packet(&ConnectOpts::new(&id)))
        .await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(ack)) if ack.code as u8 == 2));

    // A will topic with a wildcard: closed before a session starts.
    let will = format!("w/#{FORGED}");
    let opts = ConnectOpts {
        will: Some((&will, b"x", QoS::AtMostOnce, false)),
        ..ConnectOpts::new("will-topic")
    };
    let mut c = RawClient::tcp(broker.addr).await;
    c.send(&testkit::connect_packet(&opts)).await;
    assert!(c.until_closed().await.is_empty());

    // An invalid topic filter: SUBACK 0x80, logged.
    let (mut c, _) = RawClient::connect(broker.addr, ConnectOpts::new("filter")).await;
    broker.connected("filter").await;
    let mut s = rumqttc::mqttbytes::v4::Subscribe::new(format!("f/#/x{FORGED}"), QoS::AtMostOnce);
    s.pkid = 1;
    c.send(&Packet::Subscribe(s)).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));

    // A PUBLISH to a wildcard topic: protocol error, logged with the topic.
    let (mut c, _) = RawClient::connect(broker.addr, ConnectOpts::new("topic")).await;
    broker.connected("topic").await;
    c.publish(&format!("t/+{FORGED}"), QoS::AtMostOnce, false, b"x", 0)
        .await;
    assert!(c.until_closed().await.is_empty());
    broker
        .disconnected("topic", DisconnectReason::ProtocolError)
        .await;
}

async fn captured_log(format: LogFormat) -> String {
    let out = Captured::default();
    let subscriber =
        broker::telemetry::subscriber(format, EnvFilter::new("info"), out.clone(), false);
    // The test runs on a current-thread runtime: the broker's tasks log on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);
    let mut broker = TestBroker::start().await;
    misbehave(&mut broker).await;
    broker.stop().await;
    let bytes = out.0.lock().expect("log buffer").clone();
    String::from_utf8(bytes).expect("log output is UTF-8")
}

fn assert_not_forged(log: &str) {
    assert!(
        !log.contains(['\x1b', '\x07']),
        "escape sequences reached the log:\n{log}"
    );
    for line in log.lines() {
        assert!(!line.starts_with("FORGED"), "forged line:\n{log}");
    }
    // Every kind was logged (escaped), so the checks above saw them.
    for what in [
        "Client identifier rejected",
        "Invalid will topic",
        "Topic filter refused",
        "PUBLISH to an invalid topic name",
    ] {
        let line = log
            .lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no {what:?} line in:\n{log}"));
        assert!(
            line.contains("FORGED"),
            "{what}: the client string is missing: {line}"
        );
    }
}

#[tokio::test]
async fn pretty_format_escapes_client_strings() {
    let log = captured_log(LogFormat::Pretty).await;
    assert_not_forged(&log);
}

#[tokio::test]
async fn json_format_escapes_client_strings() {
    let log = captured_log(LogFormat::Json).await;
    assert_not_forged(&log);
    for line in log.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
    }
}
