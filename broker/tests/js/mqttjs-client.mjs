// One MQTT.js client, driven by broker/tests/mqttjs.rs: connects to URL (ws:// or wss://) as
// CLIENT_ID, subscribes to TOPIC at QoS 1, publishes a message to it at QoS 1, waits for it to
// come back, disconnects, and prints one JSON line: {"ok":true,...} or {"ok":false,"error":...}.
// Exits 0 on success, 1 otherwise; gives up after 10 s.
//
//   node mqttjs-client.mjs URL CLIENT_ID TOPIC [CA_FILE]
import { readFileSync } from "node:fs";
import mqtt from "mqtt";

const [url, clientId, topic, caFile] = process.argv.slice(2);
if (!url || !clientId || !topic) {
  console.error("usage: node mqttjs-client.mjs URL CLIENT_ID TOPIC [CA_FILE]");
  process.exit(2);
}

const finish = (result) => {
  console.log(JSON.stringify(result));
  process.exit(result.ok ? 0 : 1);
};
setTimeout(() => finish({ ok: false, error: "timed out after 10 s" }), 10_000).unref();

const options = {
  clientId,
  protocolVersion: 4,
  keepalive: 30,
  reconnectPeriod: 0,
  connectTimeout: 5_000,
};
if (caFile) {
  options.ca = readFileSync(caFile);
  options.servername = "localhost";
}
const client = mqtt.connect(url, options);
const payload = `hello from MQTT.js ${clientId}`;
client.on("error", (error) => finish({ ok: false, error: String(error) }));
client.on("connect", (connack) => {
  client.subscribe(topic, { qos: 1 }, (error, granted) => {
    if (error) return finish({ ok: false, error: String(error) });
    client.publish(topic, payload, { qos: 1 }, (error) => {
      if (error) finish({ ok: false, error: String(error) });
    });
  });
});
client.on("message", (received, message) => {
  if (received !== topic || message.toString() !== payload) return;
  client.end(false, {}, () => finish({ ok: true, topic: received, payload: message.toString() }));
});
