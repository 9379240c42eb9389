// An MQTT.js client at protocol level 5, driven by broker/tests/mqtt5.rs. Prints one JSON line,
// {"ok":true,...} or {"ok":false,"error":...}; exits 0 on success, 1 otherwise; gives up after
// 9 s.
//
//   node mqttjs5-client.mjs echo URL CLIENT_ID
//     subscribes to mqttjs5/CLIENT_ID at QoS 1, publishes to it at QoS 1 with the user
//     properties b=2, a=1, b=3, waits for the message to come back and prints its properties.
//   node mqttjs5-client.mjs takeover URL CLIENT_ID
//     connects and waits for the server's DISCONNECT; prints its reason code.
import mqtt from "mqtt";

const [mode, url, clientId] = process.argv.slice(2);
if (!["echo", "takeover"].includes(mode) || !url || !clientId) {
  console.error("usage: node mqttjs5-client.mjs echo|takeover URL CLIENT_ID");
  process.exit(2);
}

const finish = (result) => {
  console.log(JSON.stringify(result));
  process.exit(result.ok ? 0 : 1);
};
setTimeout(() => finish({ ok: false, error: "timed out after 9 s" }), 9_000).unref();

const client = mqtt.connect(url, {
  clientId,
  protocolVersion: 5,
  keepalive: 30,
  reconnectPeriod: 0,
  connectTimeout: 5_000,
});
client.on("error", (error) => finish({ ok: false, error: String(error) }));

if (mode === "takeover") {
  client.on("connect", () => console.error("connected"));
  client.on("disconnect", (packet) => finish({ ok: true, reasonCode: packet.reasonCode }));
  client.on("close", () => finish({ ok: false, error: "closed without a DISCONNECT" }));
} else {
  const topic = `mqttjs5/${clientId}`;
  const payload = `hello from MQTT.js 5 ${clientId}`;
  client.on("connect", () => {
    client.subscribe(topic, { qos: 1 }, (error) => {
      if (error) return finish({ ok: false, error: String(error) });
      const properties = { userProperties: { b: ["2", "3"], a: "1" } };
      client.publish(topic, payload, { qos: 1, properties }, (error) => {
        if (error) finish({ ok: false, error: String(error) });
      });
    });
  });
  client.on("message", (received, message, packet) => {
    if (received !== topic || message.toString() !== payload) return;
    client.end(false, {}, () =>
      finish({ ok: true, userProperties: packet.properties?.userProperties ?? null }),
    );
  });
}
