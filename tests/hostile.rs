//! One device can never stop the fleet. Every hostile message here is sent
//! by an independent client (`mosquitto_pub`) through a real mosquitto into
//! the real gateway binary and a throwaway PostgreSQL, interleaved with a
//! good device's stream; each test ends with an exact count of the good
//! readings and of the dead letters by reason.

// A test (or bench) that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use edge_gateway::local::{mosquitto::Mosquitto, postgres::LocalPostgres};
use tokio_postgres::Client;

/// Native JSON lines for `device`: messages `seqs`, two readings each,
/// timed from `start_ms`, one second apart (by sequence).
fn native_lines(seqs: std::ops::RangeInclusive<u64>, start_ms: i64, extra: &str) -> Vec<String> {
    seqs.map(|seq| {
        let ts = start_ms + seq as i64 * 1000;
        format!(
            r#"{{"seq":{seq},{extra}"ts":{ts},"m":{{"a":{seq},"b":{}}}}}"#,
            seq * 2
        )
    })
    .collect()
}

/// Publishes the good device's stream from a thread, paced, while the test
/// goes on; returns the readings it carries.
fn good_stream(
    port: u16,
    device: &str,
    messages: u64,
    pause: Duration,
) -> std::thread::JoinHandle<i64> {
    let topic = format!("devices/{device}/telemetry");
    let lines = native_lines(1..=messages, now_ms() - 600_000, "");
    std::thread::spawn(move || {
        mosquitto_pub(port, &topic, &lines, pause, &[]);
        messages as i64 * 2
    })
}

async fn count(client: &Client, sql: &str, device: &str) -> i64 {
    client
        .query_one(sql, &[&device])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1)
}

/// Waits until `device` has `want` readings and the gateway has made
/// durable all it received but `held` messages, then checks that each of
/// the device's (metric, time) pairs is stored exactly once.
async fn assert_device_exactly(
    client: &Client,
    gateway: &Gateway,
    device: &str,
    want: i64,
    held: u64,
) {
    let sql = format!("SELECT count(*) FROM edge.readings WHERE device_id = '{device}'");
    let got = wait_for_count(client, &sql, want, Duration::from_secs(90)).await;
    assert_eq!(got, want, "{device}: log:\n{}", gateway.log());
    caught_up(gateway, held).await;
    let distinct = count(
        client,
        "SELECT count(DISTINCT (metric, time)) FROM edge.readings WHERE device_id = $1",
        device,
    )
    .await;
    let total = count(
        client,
        "SELECT count(*) FROM edge.readings WHERE device_id = $1",
        device,
    )
    .await;
    assert_eq!((distinct, total), (want, want), "{device}: duplicates");
}

/// Dead letters by reason.
async fn dead_letters(client: &Client) -> HashMap<String, i64> {
    client
        .query(
            "SELECT reason, count(*) FROM edge.dead_letters GROUP BY reason",
            &[],
        )
        .await
        .expect("dead letters")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// PostgreSQL, mosquitto and a gateway (with `extra` config), and a CHECK
/// constraint an operator added: values of 1e12 and more are refused by
/// the database itself, after the gateway accepted them.
async fn stack_with_constraint(extra: &str) -> (LocalPostgres, Mosquitto, Gateway) {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let gateway = Gateway::start(&broker.url(), &pg.url(), extra);
    db(&pg.url())
        .await
        .batch_execute(
            "ALTER TABLE edge.readings ADD CONSTRAINT sane_value CHECK (value IS NULL OR abs(value) < 1e12)",
        )
        .await
        .expect("constraint");
    (pg, broker, gateway)
}

fn ready(gateway: &Gateway) -> bool {
    http_get(gateway.http_port, "/readyz").map(|(s, _)| s) == Some(200)
}

fn letters(n: usize) -> String {
    (0..n).map(|i| (b'a' + (i % 26) as u8) as char).collect()
}

/// Every trigger that used to wedge a writer or exhaust memory, each sent
/// once by `mosquitto_pub` while a good device streams: the good readings
/// all land exactly once, each offender is a dead letter with its reason,
/// readiness stays true, and peak RSS grows by less than 64 MiB over 1 MiB
/// messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_message_is_a_dead_letter_and_the_fleet_keeps_flowing() {
    // An alert rule every metric crosses, so the longest names the limits
    // allow also make alerts (NOTIFY payloads) and rollups.
    let (pg, broker, gateway) = stack_with_constraint(
        "[analytics]\nlateness_secs = 0.0\n[[rules]]\nname = \"high\"\nkind = \"above\"\nmetric = \"*\"\nthreshold = 1000.0\n",
    )
    .await;
    let client = db(&pg.url()).await;
    // The poison message's rollup is refused too (and left out, counted).
    client
        .batch_execute("ALTER TABLE edge.rollups_1m ADD CONSTRAINT sane_rollup CHECK (max < 1e12)")
        .await
        .expect("constraint");
    let port = broker.port();
    let good = good_stream(port, "good-1", 400, Duration::from_millis(20));
    let dir = tempfile::tempdir().expect("temp dir");
    let now = now_ms();
    let now_s = now / 1000;
    let pub1 = |topic: &str, line: String| mosquitto_pub(port, topic, &[line], Duration::ZERO, &[]);

    // Names and values at the edge.
    let long_device = format!("devices/{}/telemetry", letters(3000));
    pub1(
        &long_device,
        format!(r#"{{"seq":1,"ts":{now},"m":{{"a":1}}}}"#),
    );
    pub1(
        "devices/h-bn/telemetry",
        format!(
            r#"[{{"bn":"{}","n":"t","v":1,"t":{now_s}}}]"#,
            letters(3000)
        ),
    );
    pub1(
        "devices/h-nul/telemetry",
        format!(r#"{{"seq":1,"ts":{now},"m":{{"a\u0000b":1,"a\u0000c":2}}}}"#),
    );
    pub1(
        "devices/h-unit/telemetry",
        format!(r#"[{{"n":"t","u":"{}","v":1,"t":{now_s}}}]"#, letters(100)),
    );
    pub1(
        "devices/h-vs/telemetry",
        format!(r#"[{{"n":"t","vs":"{}","t":{now_s}}}]"#, letters(5000)),
    );
    let many: Vec<String> = (0..1001).map(|i| format!(r#""m{i}":1"#)).collect();
    pub1(
        "devices/h-series/telemetry",
        format!(r#"{{"seq":1,"ts":{now},"m":{{{}}}}}"#, many.join(",")),
    );
    // A value the database refuses (the constraint): isolated, not wedged.
    pub1(
        "devices/h-poison/telemetry",
        format!(r#"{{"seq":1,"ts":{now},"m":{{"a":1e15}}}}"#),
    );
    // The longest names the limits allow, crossing the rule: an alert
    // whose NOTIFY payload stays under PostgreSQL's 8,000 bytes.
    let long_ok = letters(128);
    pub1(
        &format!("devices/{long_ok}/telemetry"),
        format!(r#"{{"seq":1,"ts":{now},"m":{{"{long_ok}":5000}}}}"#),
    );

    // Memory: first let the gateway take what came before, then the big
    // messages.
    caught_up(&gateway, 0).await;
    let rss_before = gateway.peak_rss_kib().expect("VmHWM");
    // 198 KB: a 100,000-character base name, then 9,000 records.
    let mut bomb = format!(r#"[{{"bn":"{}","v":0}}"#, letters(100_000));
    for i in 0..9000 {
        bomb.push_str(&format!(r#",{{"v":{i}}}"#));
    }
    bomb.push(']');
    let path = dir.path().join("bomb.json");
    std::fs::write(&path, &bomb).expect("write");
    mosquitto_pub_file(port, "devices/h-bomb/telemetry", &path);
    // 1 MiB of tiny records: too many.
    let mut tiny = String::from("[");
    while tiny.len() < 1_040_000 {
        tiny.push_str(r#"{"n":"x","v":1},"#);
    }
    tiny.push_str(r#"{"n":"x","v":1}]"#);
    let path = dir.path().join("tiny.json");
    std::fs::write(&path, &tiny).expect("write");
    mosquitto_pub_file(port, "devices/h-tiny/telemetry", &path);
    // Just under 1 MiB that is valid: 9,000 string readings, all stored.
    let mut big = format!(r#"[{{"bn":"big:","bt":{now_s}}}"#);
    for i in 0..9000 {
        big.push_str(&format!(
            r#",{{"n":"s","t":-{},"vs":"{}"}}"#,
            i,
            letters(88)
        ));
    }
    big.push(']');
    assert!(
        big.len() < 1 << 20 && big.len() > 1_000_000,
        "{}",
        big.len()
    );
    let path = dir.path().join("big.json");
    std::fs::write(&path, &big).expect("write");
    mosquitto_pub_file(port, "devices/h-big/telemetry", &path);
    // Over the payload limit.
    let path = dir.path().join("huge.json");
    std::fs::write(&path, format!("[{}]", " ".repeat(1_100_000))).expect("write");
    mosquitto_pub_file(port, "devices/h-huge/telemetry", &path);

    assert!(ready(&gateway), "readyz during the hostile input");
    let good_readings = good.join().expect("good stream");
    assert_device_exactly(&client, &gateway, "good-1", good_readings, 0).await;
    assert_device_exactly(&client, &gateway, "h-big", 9000, 0).await;
    let rss_after = gateway.peak_rss_kib().expect("VmHWM");
    let grown_mib = (rss_after.saturating_sub(rss_before)) as f64 / 1024.0;
    println!("peak RSS {rss_before} KiB -> {rss_after} KiB (+{grown_mib:.1} MiB)");
    assert!(grown_mib < 64.0, "peak RSS grew by {grown_mib:.1} MiB");

    let want = [
        ("device_id_too_long", 1),
        ("metric_too_long", 2),
        ("invalid_text", 1),
        ("unit_too_long", 1),
        ("string_too_long", 1),
        ("too_many_series", 1),
        ("too_many_records", 1),
        ("payload_too_large", 1),
        ("rejected_by_database", 1),
    ];
    let complete = async || {
        let got = dead_letters(&client).await;
        want.iter()
            .all(|(r, n)| got.get(*r) == Some(n))
            .then_some(got)
    };
    let got = match eventually(Duration::from_secs(30), complete).await {
        Some(got) => got,
        None => dead_letters(&client).await,
    };
    for (reason, n) in want {
        assert_eq!(got.get(reason), Some(&n), "{reason}: {got:?}");
        assert_eq!(
            gateway.metric(&format!(
                "edge_gateway_dead_letters_total{{reason=\"{reason}\"}}"
            )),
            Some(n as f64),
            "{reason} counter"
        );
    }
    // The rejected message's rollup was refused too, and counted.
    let alerts = wait_for_count(
        &client,
        &format!("SELECT count(*) FROM edge.alerts WHERE device_id = '{long_ok}'"),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(alerts, 1, "the alert with the longest names committed");
    assert!(ready(&gateway), "readyz after the hostile input");
}

/// A batch spooled while the database was down that the database then
/// refuses for its data is isolated on replay: the offending message is a
/// dead letter, everything spooled with and after it commits. Before, the
/// replay failed forever and every later batch queued behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_spool_replays_with_the_poison_isolated() {
    let (mut pg, broker, gateway) =
        stack_with_constraint("[pipeline]\nshards = 1\n[database]\nwriters = 1\n").await;
    tokio::task::block_in_place(|| pg.stop());
    let port = broker.port();
    let start = now_ms() - 600_000;
    mosquitto_pub(
        port,
        "devices/good-2/telemetry",
        &native_lines(1..=50, start, ""),
        Duration::ZERO,
        &[],
    );
    let poison = format!(r#"{{"seq":1,"ts":{},"m":{{"a":1e15}}}}"#, now_ms());
    mosquitto_pub(
        port,
        "devices/h-poison/telemetry",
        &[poison],
        Duration::ZERO,
        &[],
    );
    mosquitto_pub(
        port,
        "devices/good-2/telemetry",
        &native_lines(51..=100, start, ""),
        Duration::ZERO,
        &[],
    );
    // Spooled (and acknowledged) while the database is down.
    let spool = "edge_gateway_spool_batches_written_total";
    wait_metric(&gateway, spool, 1.0, Duration::from_secs(30)).await;
    caught_up(&gateway, 0).await;
    tokio::task::block_in_place(|| pg.restart()).expect("restart PostgreSQL");
    let client = db(&pg.url()).await;
    mosquitto_pub(
        port,
        "devices/good-2/telemetry",
        &native_lines(101..=150, start, ""),
        Duration::ZERO,
        &[],
    );
    assert_device_exactly(&client, &gateway, "good-2", 300, 0).await;
    let got = wait_for_count(
        &client,
        "SELECT count(*) FROM edge.dead_letters WHERE reason = 'rejected_by_database' AND device_id = 'h-poison'",
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(got, 1, "log:\n{}", gateway.log());
    assert!(ready(&gateway));
}

/// A device that reboots and starts its sequence again loses nothing,
/// with or without a boot id; true repeats are still dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebooted_device_loses_nothing_with_or_without_a_boot_id() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let gateway = Gateway::start(&broker.url(), &pg.url(), "");
    let client = db(&pg.url()).await;
    let port = broker.port();
    let start = now_ms() - 3_600_000;
    // Without a boot id: seq 1..1500, reboot, seq 1..200 with later times.
    let mut lines = native_lines(1..=1500, start, "");
    lines.extend(native_lines(1..=200, start + 2_000_000, ""));
    // A true repeat of the last message: dropped.
    lines.push(lines[lines.len() - 1].clone());
    mosquitto_pub(
        port,
        "devices/reboot-plain/telemetry",
        &lines,
        Duration::ZERO,
        &[],
    );
    // With a boot id: 300 messages in boot 7, then boot 8 starts again at 1
    // (even with older timestamps: a device without a clock).
    let mut lines = native_lines(1..=300, start, r#""boot":7,"#);
    lines.extend(native_lines(1..=100, start - 1_000_000, r#""boot":8,"#));
    mosquitto_pub(
        port,
        "devices/reboot-boot/telemetry",
        &lines,
        Duration::ZERO,
        &[],
    );
    assert_device_exactly(&client, &gateway, "reboot-plain", 1700 * 2, 0).await;
    assert_device_exactly(&client, &gateway, "reboot-boot", 400 * 2, 0).await;
    assert_eq!(
        gateway.metric("edge_gateway_device_restarts_total"),
        Some(2.0)
    );
    assert_eq!(gateway.metric("edge_gateway_duplicates_total"), Some(1.0));
    assert!(
        gateway
            .log()
            .contains("device restarted its message sequence"),
        "a restart is logged"
    );
    // The stored window moved to the new boot, so the restart survives a
    // gateway restart.
    let epoch: i64 = client
        .query_one(
            "SELECT epoch FROM edge.device_watermarks WHERE device_id = 'reboot-plain'",
            &[],
        )
        .await
        .expect("watermark")
        .get(0);
    assert_eq!(epoch, 1);
}

/// A SenML pack with times relative to "now" that was committed but not
/// yet acknowledged when the gateway died is redelivered by the broker and
/// must not be stored twice (its identity is recorded with the rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_senml_redelivered_after_sigkill_is_not_stored_twice() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let mut gateway = Gateway::start(
        &broker.url(),
        &pg.url(),
        "[pipeline]\nshards = 2\n[database]\nwriters = 2\n",
    );
    let client = db(&pg.url()).await;
    let port = broker.port();
    // X and Y on different shards, so on different writers.
    let name = |i: usize| format!("rel-{i}");
    let x = (0..)
        .map(name)
        .find(|d| edge_gateway::shard::shard_of(d, 2) == 0)
        .unwrap_or_default();
    let y = (0..)
        .map(name)
        .find(|d| edge_gateway::shard::shard_of(d, 2) == 1)
        .unwrap_or_default();
    let start = now_ms() - 600_000;
    let x_topic = format!("devices/{x}/telemetry");
    mosquitto_pub(
        port,
        &x_topic,
        &native_lines(1..=1, start, ""),
        Duration::ZERO,
        &[],
    );
    assert_device_exactly(&client, &gateway, &x, 2, 0).await;
    // Hold X's next commit on its watermark row: its acks, and the acks of
    // everything received after it, wait.
    let mut locker = db(&pg.url()).await;
    let lock = locker.transaction().await.expect("begin");
    lock.execute(
        "SELECT 1 FROM edge.device_watermarks WHERE device_id = $1 FOR UPDATE",
        &[&x],
    )
    .await
    .expect("lock X's watermark");
    mosquitto_pub(
        port,
        &x_topic,
        &native_lines(2..=2, start, ""),
        Duration::ZERO,
        &[],
    );
    // X's message arrives and waits on the lock.
    let not_durable = "edge_gateway_messages_not_durable";
    wait_metric(&gateway, not_durable, 1.0, Duration::from_secs(30)).await;
    let packs: Vec<String> = (0..100)
        .map(|i| format!(r#"[{{"n":"temp","v":{i}}}]"#))
        .collect();
    mosquitto_pub(
        port,
        &format!("devices/{y}/telemetry"),
        &packs,
        Duration::ZERO,
        &[],
    );
    // Y's packs are committed, not acknowledged (X's message is older and
    // held by the lock).
    assert_device_exactly(&client, &gateway, &y, 100, 1).await;
    gateway.kill();
    lock.rollback().await.expect("release the lock");
    gateway.spawn();
    assert_device_exactly(&client, &gateway, &x, 4, 0).await;
    // Every redelivered pack was recognised (once they have arrived).
    // The broker redelivered Y's 100 packs.
    wait_metric_exactly(
        &gateway,
        "edge_gateway_duplicates_total",
        100.0,
        Duration::from_secs(30),
    )
    .await;
    assert_device_exactly(&client, &gateway, &y, 100, 0).await;
}

/// A SenML pack re-sent after its identity has left the shard worker's
/// memory (`dedup.max_identities`) is caught by the database: the writer's
/// COPY of the batch's identities fails on `message_ids`' key, rolls back
/// to its savepoint, and the insert that follows names the repeat. Packs
/// never seen before still commit, in the same and in later batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_senml_repeat_the_workers_forgot_is_caught_by_the_database() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let gateway = Gateway::start(
        &broker.url(),
        &pg.url(),
        "[pipeline]\nshards = 1\n[dedup]\nmax_identities = 2\n",
    );
    let client = db(&pg.url()).await;
    let port = broker.port();
    let device = "forgetful";
    let topic = format!("devices/{device}/telemetry");
    let t0 = now_ms() as f64 / 1000.0 - 600.0;
    let pack = |i: usize| format!(r#"[{{"n":"temp","t":{},"v":{i}}}]"#, t0 + i as f64);
    // Four packs, each committed before the next: the worker now remembers
    // only the last two.
    for i in 0..4 {
        mosquitto_pub(port, &topic, &[pack(i)], Duration::ZERO, &[]);
        assert_device_exactly(&client, &gateway, device, i as i64 + 1, 0).await;
    }
    // The first two again, with a new one between them.
    let again = [pack(0), pack(4), pack(1)];
    mosquitto_pub(port, &topic, &again, Duration::ZERO, &[]);
    assert_device_exactly(&client, &gateway, device, 5, 0).await;
    wait_metric_exactly(
        &gateway,
        "edge_gateway_duplicates_total",
        2.0,
        Duration::from_secs(30),
    )
    .await;
    let ids: i64 = client
        .query_one("SELECT count(*) FROM edge.message_ids", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1);
    assert_eq!(ids, 5, "one identity per distinct pack");
}

/// 200,000 distinct device ids through a gateway capped at 50,000 series:
/// the series gauge never passes the cap, memory stays under the bound,
/// and every evicted series wrote its final rollup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_churn_stays_within_the_series_cap_and_writes_every_rollup() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let mut gateway = Gateway::start(
        &broker.url(),
        &pg.url(),
        "[pipeline]\nshards = 2\n[limits]\nmax_series = 50000\nmax_dedup_devices = 50000\n",
    );
    let client = db(&pg.url()).await;
    let mut config = sim(
        &broker.url(),
        edge_payload::Format::NativeCbor,
        200_000,
        1,
        now_ms() - 60_000,
    );
    config.metrics = 1;
    config.device_prefix = "churn-".into();
    let run = tokio::spawn(async move {
        firmware_sim::run(&config, tokio_util::sync::CancellationToken::new()).await
    });
    let mut max_series = 0.0f64;
    let count = "SELECT count(*) FROM edge.readings WHERE starts_with(device_id, 'churn-')";
    eventually(Duration::from_secs(240), async || {
        max_series = max_series.max(gateway.metric("edge_gateway_analytics_series")?);
        let n: i64 = client.query_one(count, &[]).await.ok()?.get(0);
        (n >= 200_000).then_some(())
    })
    .await;
    let summary = run.await.expect("sim task").expect("sim");
    assert_eq!(summary.readings, 200_000);
    assert_device_count(&client, count, 200_000, &gateway).await;
    // Workers publish their eviction counts on their clock tick, which lags
    // the commits under load: wait for the count the cap implies.
    let mut evicted = 0.0;
    eventually(Duration::from_secs(30), async || {
        evicted = gateway.metric("edge_gateway_series_evicted_total")?;
        (evicted >= 150_000.0).then_some(())
    })
    .await;
    let peak_mib = gateway.peak_rss_kib().unwrap_or(0) as f64 / 1024.0;
    println!("series gauge max {max_series}, evicted {evicted}, peak RSS {peak_mib:.0} MiB");
    assert!(max_series <= 50_000.0, "series gauge reached {max_series}");
    assert!(evicted >= 150_000.0, "evicted {evicted}");
    // The documented bound (config/gateway.toml [limits]): about 1 KiB a
    // series and 250 bytes a sequence window, over a base of tens of MiB.
    assert!(peak_mib < 256.0, "peak RSS {peak_mib:.0} MiB");
    // Evicted series wrote their rollups as they went, the rest at drain.
    assert!(gateway.stop(), "clean shutdown; log:\n{}", gateway.log());
    let rollups: (i64, i64) = client
        .query_one(
            "SELECT count(*), coalesce(sum(count), 0)::int8 FROM edge.rollups_1m WHERE starts_with(device_id, 'churn-')",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("rollups");
    assert_eq!(rollups, (200_000, 200_000));
}

async fn assert_device_count(client: &Client, sql: &str, want: i64, gateway: &Gateway) {
    let got = wait_for_count(client, sql, want, Duration::from_secs(60)).await;
    assert_eq!(got, want, "log:\n{}", gateway.log());
}

/// A writer that can neither commit (database down) nor spool (its spool
/// directory replaced by a file) stops the gateway with a non-zero exit
/// within `pipeline.stall_secs`; nothing it held was acknowledged, so a
/// restarted gateway gets every message again from the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_fails_hard_stops_the_gateway_and_nothing_is_lost() {
    let mut pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let mut gateway = Gateway::start(&broker.url(), &pg.url(), "[pipeline]\nstall_secs = 3\n");
    tokio::task::block_in_place(|| pg.stop());
    let spool = gateway.spool_dir();
    let writers: Vec<_> = std::fs::read_dir(&spool)
        .expect("spool dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(!writers.is_empty());
    for dir in &writers {
        std::fs::remove_dir_all(dir).expect("remove writer spool");
        std::fs::write(dir, b"not a directory").expect("replace it with a file");
    }
    let start = now_ms() - 600_000;
    mosquitto_pub(
        broker.port(),
        "devices/sup-1/telemetry",
        &native_lines(1..=20, start, ""),
        Duration::ZERO,
        &[],
    );
    let began = Instant::now();
    let code = tokio::task::block_in_place(|| gateway.wait_exit(Duration::from_secs(30)));
    println!("exited with {code:?} after {:?}", began.elapsed());
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit {code:?}; log:\n{}",
        gateway.log()
    );
    assert!(
        gateway.log().contains("cannot commit or spool"),
        "log:\n{}",
        gateway.log()
    );
    for dir in &writers {
        std::fs::remove_file(dir).expect("remove the file");
    }
    tokio::task::block_in_place(|| pg.restart()).expect("restart PostgreSQL");
    gateway.spawn();
    let client = db(&pg.url()).await;
    assert_device_exactly(&client, &gateway, "sup-1", 40, 0).await;
}

/// 60 seconds of 100 devices with a tenth of all messages hostile, and the
/// database restarted once: every good reading exactly once, every bad
/// message accounted for (stored as a dead letter, or counted over the
/// per-device budget).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_seconds_of_chaos_lose_nothing_and_account_for_every_bad_message() {
    let (mut pg, broker, gateway) =
        stack_with_constraint("[limits]\nmax_dead_letters_per_device_minute = 200\n").await;
    // Good: 100 devices x 600 samples of 2 metrics, 5 samples a message,
    // 10 samples a second: 12,000 messages over 60 s.
    let mut good = sim(
        &broker.url(),
        edge_payload::Format::NativeCbor,
        100,
        600,
        now_ms() - 3_600_000,
    );
    good.rate = 10.0;
    good.pack = 5;
    good.persistent = true;
    good.device_prefix = "chaos-".into();
    let run = {
        let good = good.clone();
        tokio::spawn(async move {
            firmware_sim::run(&good, tokio_util::sync::CancellationToken::new()).await
        })
    };
    // Hostile: 4 devices x 300 messages (a tenth), one every 200 ms.
    let now = now_ms();
    let kinds = [
        "{not json".to_string(),
        format!(r#"{{"seq":1,"ts":{now},"m":{{"a\u0000":1}}}}"#),
        format!(r#"[{{"bn":"{}","v":1}}]"#, letters(300)),
        format!(r#"{{"seq":1,"ts":{now},"m":{{"a":1e15}}}}"#),
        format!(r#"{{"seq":1,"ts":{},"m":{{"a":1}}}}"#, now + 86_400_000),
        r#"[{"n":"t","v":1,"x_":1}]"#.to_string(),
    ];
    let port = broker.port();
    let hostile: Vec<_> = (0..4)
        .map(|h| {
            let lines: Vec<String> = (0..300)
                .map(|i| {
                    let mut line = kinds[(i + h) % kinds.len()].clone();
                    // Distinct bytes, so none is a duplicate of another.
                    if line.starts_with("{\"seq\"") {
                        line = line.replacen("\"seq\":1", &format!("\"seq\":{}", i + 1), 1);
                    }
                    line
                })
                .collect();
            std::thread::spawn(move || {
                mosquitto_pub(
                    port,
                    &format!("devices/bad-{h}/telemetry"),
                    &lines,
                    Duration::from_millis(200),
                    &[],
                );
            })
        })
        .collect();
    // The database goes away a third of the way in, and comes back once
    // the gateway has spooled through the outage.
    let committed = "edge_gateway_readings_committed_total";
    wait_metric(&gateway, committed, 40_000.0, Duration::from_secs(120)).await;
    tokio::task::block_in_place(|| pg.stop());
    let spooled = gateway
        .metric("edge_gateway_spool_batches_written_total")
        .unwrap_or(0.0);
    let spool = "edge_gateway_spool_batches_written_total";
    wait_metric(&gateway, spool, spooled + 2.0, Duration::from_secs(60)).await;
    tokio::task::block_in_place(|| pg.restart()).expect("restart PostgreSQL");
    for h in hostile {
        h.join().expect("hostile publisher");
    }
    let summary = run.await.expect("sim task").expect("sim");
    assert_eq!(summary.readings, 120_000);
    let client = db(&pg.url()).await;
    assert_landed(&client, &gateway, &good).await;
    let sql = "SELECT count(*) FROM edge.dead_letters WHERE starts_with(device_id, 'bad-')";
    let figures = async || {
        let stored: i64 = client.query_one(sql, &[]).await.map_or(0, |r| r.get(0));
        let suppressed = gateway
            .metric("edge_gateway_dead_letters_suppressed_total")
            .unwrap_or(0.0) as i64;
        (stored, suppressed)
    };
    let (stored, suppressed) = match eventually(Duration::from_secs(60), async || {
        let (stored, suppressed) = figures().await;
        (stored + suppressed >= 1200).then_some((stored, suppressed))
    })
    .await
    {
        Some(got) => got,
        None => figures().await,
    };
    println!("hostile: {stored} stored as dead letters, {suppressed} counted over the budget");
    assert_eq!(stored + suppressed, 1200, "log:\n{}", gateway.log());
    let rejected: i64 = client
        .query_one(
            "SELECT count(*) FROM edge.dead_letters WHERE reason = 'rejected_by_database'",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0);
    assert!(
        rejected > 0,
        "the database's own refusals were isolated too"
    );
    assert!(ready(&gateway));
}
