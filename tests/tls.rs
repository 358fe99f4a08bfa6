//! TLS to the broker (CA, client certificate, user and password) and to
//! PostgreSQL (sslmode=require, verified), with certificates made here.

// A test (or bench) that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use edge_gateway::local::{mosquitto::Mosquitto, postgres::LocalPostgres};

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client one.
fn make_certs(dir: &Path) {
    let openssl = require_binary("openssl", "openssl");
    let p = |name: &str| dir.join(name).display().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(Command::new(&openssl)
        .args(["req", "-x509"])
        .args(ec)
        .args([
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.crt"),
            "-days",
            "2",
            "-subj",
            "/CN=edge-test-ca",
        ]));
    for (name, usage, san) in [
        (
            "server",
            "serverAuth",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        ),
        ("client", "clientAuth", ""),
    ] {
        std::fs::write(
            p(&format!("{name}.ext")),
            format!("{san}basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"),
        )
        .expect("ext file");
        run(Command::new(&openssl).arg("req").args(ec).args([
            "-keyout",
            &p(&format!("{name}.key")),
            "-out",
            &p(&format!("{name}.csr")),
            "-subj",
            &format!("/CN={name}"),
        ]));
        run(Command::new(&openssl).args([
            "x509",
            "-req",
            "-in",
            &p(&format!("{name}.csr")),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-out",
            &p(&format!("{name}.crt")),
            "-days",
            "2",
            "-extfile",
            &p(&format!("{name}.ext")),
        ]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_broker_and_the_database() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = |name: &str| dir.path().join(name).display().to_string();
    make_certs(dir.path());
    let passwd = require_binary("mosquitto_passwd", "mosquitto");
    run(Command::new(&passwd).args(["-b", "-c", &p("passwords"), "gw", "gw-secret"]));
    run(Command::new(&passwd).args(["-b", &p("passwords"), "device", "device-secret"]));
    std::fs::write(p("gw.password"), "gw-secret\n").expect("password file");

    let broker = Mosquitto::start_with(&[
        &format!("cafile {}", p("ca.crt")),
        &format!("certfile {}", p("server.crt")),
        &format!("keyfile {}", p("server.key")),
        "require_certificate true",
        "allow_anonymous false",
        &format!("password_file {}", p("passwords")),
    ])
    .expect("mosquitto with TLS");
    let pg = LocalPostgres::start_tls(
        &dir.path().join("server.crt"),
        &dir.path().join("server.key"),
    )
    .expect("PostgreSQL with TLS");
    let mqtts = format!("mqtts://127.0.0.1:{}", broker.port());
    let database = format!("{}?sslmode=require", pg.url());
    let extra = format!(
        "[mqtt]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nusername = \"gw\"\npassword_file = \"{}\"\n\
         [database]\nca_file = \"{}\"\n",
        p("ca.crt"),
        p("client.crt"),
        p("client.key"),
        p("gw.password"),
        p("ca.crt")
    );
    let gateway = Gateway::start(&mqtts, &database, &extra);

    let start_ms = now_ms() - 60_000;
    let lines: Vec<String> = (0..10)
        .map(|i| {
            format!(
                r#"{{"seq":{},"ts":{},"m":{{"temperature":{}}}}}"#,
                i + 1,
                start_ms + i * 1000,
                20 + i
            )
        })
        .collect();
    let tls_args = [
        "--cafile",
        &p("ca.crt"),
        "--cert",
        &p("client.crt"),
        "--key",
        &p("client.key"),
        "-u",
        "device",
        "-P",
        "device-secret",
    ];
    mosquitto_pub(
        broker.port(),
        "devices/secure-1/telemetry",
        &lines,
        Duration::ZERO,
        &tls_args,
    );

    // The test's own client trusts the server the same way.
    let db_client = {
        let tls = edge_gateway::tls::client_config(&p("ca.crt"), "", "").expect("tls config");
        let connector = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
        let (client, connection) = tokio_postgres::connect(&database, connector)
            .await
            .expect("TLS connect");
        tokio::spawn(connection);
        client
    };
    let got = wait_for_count(
        &db_client,
        "SELECT count(*) FROM edge.readings",
        10,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(got, 10, "log:\n{}", gateway.log());
    let encrypted: Vec<bool> = db_client
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'edge-gateway'",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        !encrypted.is_empty() && encrypted.iter().all(|&s| s),
        "gateway sessions: {encrypted:?}"
    );

    // check-config shows where secrets come from, never the secrets.
    let config = dir.path().join("check.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nurl = \"{mqtts}\"\n{}[database]\nurl = \"postgresql://gw:db-secret@127.0.0.1:{}/postgres?sslmode=require\"\nca_file = \"{}\"\n",
            extra.split("[database]").next().unwrap_or("").trim_start_matches("[mqtt]\n"),
            pg.port(),
            p("ca.crt")
        ),
    )
    .expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
        .args(["check-config", "--config"])
        .arg(&config)
        .env("GATEWAY_MQTT_PASSWORD", "env-secret")
        .env_remove("GATEWAY_DATABASE_URL")
        .output()
        .expect("check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("password_file") && text.contains("mqtts://"),
        "{text}"
    );
    for secret in ["gw-secret", "env-secret", "db-secret"] {
        assert!(!text.contains(secret), "{secret} printed: {text}");
    }
}
