#!/usr/bin/env python3
"""The baseline a gateway must beat: a plain MQTT-to-PostgreSQL consumer.

paho-mqtt (QoS 1, persistent session, acks on receipt), cbor2 for SenML
CBOR packs (resolved: base name + name, base time + time, unit or base
unit), psycopg binary COPY of 20,000 rows a transaction. No duplicate
check, no analytics, no spool: what a 70-line script does. benches/e2e.rs
runs it on the same backlog as the gateway (E2E_PEER). It exits once
PEER_EXPECT readings are committed.

Environment: PEER_MQTT_HOST, PEER_MQTT_PORT, PEER_CLIENT_ID, PEER_TOPIC,
PEER_DATABASE_URL, PEER_EXPECT, PEER_BATCH (20000).
"""
import datetime
import os
import sys

import cbor2
import paho.mqtt.client as mqtt
import psycopg

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
COPY = "COPY edge.readings (time, device_id, metric, value, unit) FROM STDIN (FORMAT BINARY)"

expect = int(os.environ["PEER_EXPECT"])
batch = int(os.environ.get("PEER_BATCH", "20000"))
db = psycopg.connect(os.environ["PEER_DATABASE_URL"])
rows = []
committed = 0


def flush():
    global rows, committed
    with db.cursor() as cur:
        with cur.copy(COPY) as copy:
            copy.set_types(["timestamptz", "text", "text", "float8", "text"])
            for row in rows:
                copy.write_row(row)
    db.commit()
    committed += len(rows)
    rows = []


def on_message(client, userdata, msg):
    device = msg.topic.split("/")[1]
    bn, bt, bu = "", 0.0, None
    for r in cbor2.loads(msg.payload):
        bn = r.get(-2, bn)
        bt = r.get(-3, bt)
        bu = r.get(-4, bu)
        if 2 in r:
            t = bt + r.get(6, 0.0)
            rows.append((EPOCH + datetime.timedelta(seconds=t), device,
                         bn + r.get(0, ""), float(r[2]), r.get(1, bu)))
    if len(rows) >= batch or committed + len(rows) >= expect:
        flush()
    if committed >= expect:
        client.disconnect()


client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                     client_id=os.environ["PEER_CLIENT_ID"], clean_session=False)
client.on_message = on_message
client.on_connect = lambda c, u, f, rc, p: c.subscribe(os.environ["PEER_TOPIC"], qos=1)
client.max_inflight_messages_set(1000)
client.connect(os.environ["PEER_MQTT_HOST"], int(os.environ["PEER_MQTT_PORT"]))
client.loop_forever()
print(f"peer: {committed} readings committed", file=sys.stderr)
