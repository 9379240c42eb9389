//! MQTT over WebSocket and WebSocket over TLS with a real WebSocket client (tokio-tungstenite),
//! X-Forwarded-For from trusted proxies only, the PROXY protocol in front of TCP and TLS, and
//! refused upgrades counted by reason.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use broker::config::MqttConfig;
use broker::event::ConnectionEvent;
use broker::labels::{DisconnectReason, HandshakeFailure, Listener};
use broker::metrics::metrics;
use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{Packet, Subscribe};
use rumqttc::mqttbytes::QoS;
use testkit::tls::{client_config, tls_connect, Ca, Validity};
use testkit::{connect_packet, encode, eventually, temp_dir, ConnectOpts, RawClient, TestBroker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A WebSocket client handshake over `stream` to `path`, offering `protocol`, with extra
/// header fields.
async fn ws_client<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    path: &str,
    protocol: Option<&str>,
    headers: &[(&'static str, &str)],
) -> Result<WebSocketStream<S>, tokio_tungstenite::tungstenite::Error> {
    let mut request = format!("ws://localhost{path}")
        .into_client_request()
        .expect("request");
    if let Some(protocol) = protocol {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", protocol.parse().expect("header"));
    }
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, value.parse().expect("header"));
    }
    tokio_tungstenite::client_async(request, stream)
        .await
        .map(|(ws, _)| ws)
}

/// The next MQTT packet in the binary messages of `ws` (`buf` keeps what is left over).
async fn next_packet<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    buf: &mut bytes::BytesMut,
) -> Packet {
    tokio::time::timeout(testkit::WAIT, async {
        loop {
            if let Ok(packet) = Packet::read(buf, usize::MAX) {
                return packet;
            }
            match ws.next().await {
                Some(Ok(Message::Binary(data))) => buf.extend_from_slice(&data),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a binary message, got {other:?}"),
            }
        }
    })
    .await
    .expect("a packet within the deadline")
}

/// Sends `packet` in one binary message.
async fn send<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, packet: &Packet) {
    ws.send(Message::binary(encode(packet).to_vec()))
        .await
        .expect("send");
}

/// CONNECT as `client_id` and its CONNACK; the bytes received after it.
async fn mqtt_connect<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    client_id: &str,
) -> bytes::BytesMut {
    send(ws, &connect_packet(&ConnectOpts::new(client_id))).await;
    let mut buf = bytes::BytesMut::new();
    assert!(matches!(
        next_packet(ws, &mut buf).await,
        Packet::ConnAck(_)
    ));
    buf
}

fn peer_of(event: ConnectionEvent) -> (SocketAddr, Listener) {
    match event {
        ConnectionEvent::Connected { peer, listener, .. } => (peer, listener),
        other => panic!("expected Connected, got {other:?}"),
    }
}

fn ws_config(config: &mut MqttConfig) {
    config.ws.listen = Some("127.0.0.1:0".parse().expect("addr"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websocket_in_any_framing() {
    let mut broker = TestBroker::start_with(ws_config).await;
    let ws_addr = broker.ws.expect("ws listener");
    let tcp = TcpStream::connect(ws_addr).await.expect("connect");
    let mut ws = ws_client(tcp, "/mqtt", Some("mqtt"), &[])
        .await
        .expect("upgrade with subprotocol mqtt");

    // CONNECT and SUBSCRIBE in one message.
    let mut both = encode(&connect_packet(&ConnectOpts::new("browser")));
    let mut subscribe = Subscribe::new("chat/#", QoS::AtLeastOnce);
    subscribe.pkid = 1;
    both.extend_from_slice(&encode(&Packet::Subscribe(subscribe)));
    ws.send(Message::binary(both.to_vec())).await.expect("send");
    let mut buf = bytes::BytesMut::new();
    assert!(matches!(
        next_packet(&mut ws, &mut buf).await,
        Packet::ConnAck(_)
    ));
    assert!(matches!(
        next_packet(&mut ws, &mut buf).await,
        Packet::SubAck(_)
    ));
    let (peer, listener) = peer_of(broker.connected("browser").await);
    assert_eq!(listener, Listener::Ws);
    assert_eq!(peer.ip(), ws_addr.ip());

    // A PUBLISH over TCP reaches the WebSocket client.
    let (mut publisher, _) = RawClient::connect(broker.addr, ConnectOpts::new("tcp-pub")).await;
    broker.connected("tcp-pub").await;
    publisher
        .publish("chat/room", QoS::AtMostOnce, false, b"hello browser", 0)
        .await;
    match next_packet(&mut ws, &mut buf).await {
        Packet::Publish(p) => assert_eq!(&p.payload[..], b"hello browser"),
        other => panic!("expected PUBLISH, got {other:?}"),
    }

    // One PUBLISH split over three messages, delivered to a TCP subscriber.
    publisher.subscribe("from-browser", QoS::AtMostOnce).await;
    let mut publish =
        rumqttc::mqttbytes::v4::Publish::new("from-browser", QoS::AtMostOnce, vec![7u8; 300]);
    publish.retain = false;
    let bytes = encode(&Packet::Publish(publish));
    for part in [&bytes[..1], &bytes[1..100], &bytes[100..]] {
        ws.send(Message::binary(part.to_vec())).await.expect("send");
    }
    match publisher.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(p.payload.len(), 300),
        other => panic!("expected the browser's PUBLISH, got {other:?}"),
    }

    // PINGREQ, then a WebSocket close: a clean end without DISCONNECT is connection_lost.
    send(&mut ws, &Packet::PingReq).await;
    assert!(matches!(
        next_packet(&mut ws, &mut buf).await,
        Packet::PingResp
    ));
    ws.close(None).await.expect("close");
    broker
        .disconnected("browser", DisconnectReason::ConnectionLost)
        .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqttv31_subprotocol_and_disconnect() {
    let mut broker = TestBroker::start_with(ws_config).await;
    let tcp = TcpStream::connect(broker.ws.expect("ws"))
        .await
        .expect("connect");
    let mut ws = ws_client(tcp, "/mqtt", Some("mqttv3.1"), &[])
        .await
        .expect("upgrade with subprotocol mqttv3.1");
    mqtt_connect(&mut ws, "old-sdk").await;
    broker.connected("old-sdk").await;
    send(&mut ws, &Packet::Disconnect).await;
    broker
        .disconnected("old-sdk", DisconnectReason::ClientDisconnect)
        .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upgrades_are_counted_by_reason() {
    let mut broker = TestBroker::start_with(|c| {
        ws_config(c);
        c.connect_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = broker.ws.expect("ws");
    let count = |reason| metrics().handshake_failures.get(Listener::Ws, reason);
    let cases: [(&str, Option<&str>, HandshakeFailure, &str); 3] = [
        (
            "/mqtt",
            Some("chat"),
            HandshakeFailure::WsSubprotocol,
            "400",
        ),
        ("/mqtt", None, HandshakeFailure::WsSubprotocol, "400"),
        ("/other", Some("mqtt"), HandshakeFailure::WsPath, "404"),
    ];
    for (path, protocol, reason, status) in cases {
        let before = count(reason);
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let error = ws_client(tcp, path, protocol, &[])
            .await
            .expect_err("refused");
        assert!(
            error.to_string().contains(status),
            "{path} {protocol:?}: {error}"
        );
        eventually(&format!("{reason} counted"), || async {
            (count(reason) > before).then_some(())
        })
        .await;
    }

    // Not HTTP at all (an MQTT client on the WebSocket port).
    let before = count(HandshakeFailure::WsRequest);
    let mut raw = TcpStream::connect(addr).await.expect("connect");
    raw.write_all(&encode(&connect_packet(&ConnectOpts::new("lost"))))
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(testkit::WAIT, raw.read_to_end(&mut answer)).await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 400"),
        "{answer:?}"
    );
    eventually("ws_request counted", || async {
        (count(HandshakeFailure::WsRequest) > before).then_some(())
    })
    .await;

    // A request that never ends: closed at the connect timeout.
    let before = count(HandshakeFailure::Timeout);
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut sink = Vec::new();
    tokio::time::timeout(testkit::WAIT, slow.read_to_end(&mut sink))
        .await
        .expect("closed at the connect timeout")
        .ok();
    eventually("timeout counted", || async {
        (count(HandshakeFailure::Timeout) > before).then_some(())
    })
    .await;
    broker.no_event_pending();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_believed_from_trusted_proxies_only() {
    for (trusted, expected) in [
        (vec!["127.0.0.0/8"], Some("203.0.113.7")),
        (vec!["10.0.0.1/32"], None),
    ] {
        let mut broker = TestBroker::start_with(|c| {
            ws_config(c);
            c.ws.trusted_proxies = trusted
                .iter()
                .map(|n| n.parse().expect("network"))
                .collect();
        })
        .await;
        let tcp = TcpStream::connect(broker.ws.expect("ws"))
            .await
            .expect("connect");
        let mut ws = ws_client(
            tcp,
            "/mqtt",
            Some("mqtt"),
            &[("X-Forwarded-For", "198.51.100.1, 203.0.113.7")],
        )
        .await
        .expect("upgrade");
        send(&mut ws, &connect_packet(&ConnectOpts::new("proxied"))).await;
        let (peer, _) = peer_of(broker.connected("proxied").await);
        match expected {
            Some(ip) => assert_eq!(peer, format!("{ip}:0").parse().expect("addr")),
            None => assert!(peer.ip().is_loopback(), "{peer}"),
        }
        broker.stop().await;
    }
}

/// A CA, a server certificate for localhost and the files of both.
fn server_files() -> (testkit::TempDir, Ca, PathBuf, PathBuf) {
    let dir = temp_dir("wss");
    let ca = Ca::new("Heartwire test CA");
    let (cert, key) = ca
        .server(&["localhost"], Validity::Now)
        .write(dir.path(), "server");
    (dir, ca, cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websocket_over_tls() {
    let (_dir, ca, cert, key) = server_files();
    let mut broker = TestBroker::start_with(|c| {
        c.wss.listen = Some("127.0.0.1:0".parse().expect("addr"));
        c.tls.cert_file = Some(cert.clone());
        c.tls.key_file = Some(key.clone());
    })
    .await;
    let tls = tls_connect(
        broker.wss.expect("wss"),
        "localhost",
        client_config(&ca.pem(), None),
    )
    .await
    .expect("TLS");
    let mut ws = ws_client(tls, "/mqtt", Some("mqtt"), &[])
        .await
        .expect("upgrade over TLS");
    mqtt_connect(&mut ws, "secure-browser").await;
    let (_, listener) = peer_of(broker.connected("secure-browser").await);
    assert_eq!(listener, Listener::Wss);
    assert_eq!(metrics().listener_connections.get(Listener::Wss), 1);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_gives_the_device_address() {
    let (_dir, ca, cert, key) = server_files();
    let mut broker = TestBroker::start_with(|c| {
        c.proxy_protocol = true;
        c.tls.listen = Some("127.0.0.1:0".parse().expect("addr"));
        c.tls.cert_file = Some(cert.clone());
        c.tls.key_file = Some(key.clone());
        c.tls.proxy_protocol = true;
    })
    .await;

    // v1 in front of plain MQTT, in the same segment as the CONNECT.
    let mut tcp = TcpStream::connect(broker.addr).await.expect("connect");
    let mut first = b"PROXY TCP4 198.51.100.9 10.0.0.1 51000 1883\r\n".to_vec();
    first.extend_from_slice(&encode(&connect_packet(&ConnectOpts::new("behind-lb"))));
    tcp.write_all(&first).await.expect("write");
    let mut c = RawClient::over(tcp);
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(_))));
    let (peer, listener) = peer_of(broker.connected("behind-lb").await);
    assert_eq!(
        (peer, listener),
        ("198.51.100.9:51000".parse().expect("addr"), Listener::Tcp)
    );

    // v2 in front of TLS.
    let mut tcp = TcpStream::connect(broker.tls.expect("tls"))
        .await
        .expect("connect");
    tcp.write_all(&proxy_v2_ipv4([192, 0, 2, 44], 40_000, [10, 0, 0, 1], 8883))
        .await
        .expect("write");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(client_config(&ca.pem(), None))
        .connect(name, tcp)
        .await
        .expect("TLS after the PROXY header");
    let (_c, _) = RawClient::over(tls)
        .handshake(ConnectOpts::new("tls-behind-lb"))
        .await;
    let (peer, listener) = peer_of(broker.connected("tls-behind-lb").await);
    assert_eq!(
        (peer, listener),
        ("192.0.2.44:40000".parse().expect("addr"), Listener::Tls)
    );

    // No header where one is required: closed and counted.
    let before = metrics()
        .handshake_failures
        .get(Listener::Tcp, HandshakeFailure::ProxyHeader);
    let mut direct = RawClient::tcp(broker.addr).await;
    direct
        .send(&connect_packet(&ConnectOpts::new("no-header")))
        .await;
    assert!(direct.until_closed().await.is_empty());
    eventually("proxy_header counted", || async {
        (metrics()
            .handshake_failures
            .get(Listener::Tcp, HandshakeFailure::ProxyHeader)
            > before)
            .then_some(())
    })
    .await;
    broker.no_event_pending();
    broker.stop().await;
}

/// A PROXY protocol v2 header: PROXY command, TCP over IPv4.
fn proxy_v2_ipv4(src: [u8; 4], src_port: u16, dst: [u8; 4], dst_port: u16) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.push(0x21); // version 2, PROXY
    header.push(0x11); // AF_INET, STREAM
    header.extend_from_slice(&12u16.to_be_bytes());
    header.extend_from_slice(&src);
    header.extend_from_slice(&dst);
    header.extend_from_slice(&src_port.to_be_bytes());
    header.extend_from_slice(&dst_port.to_be_bytes());
    header
}
