//! The firmware-sim binary against a real broker.

// A test (or bench) that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use edge_gateway::local::mosquitto::Mosquitto;

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
        .args(args)
        .output()
        .expect("run firmware-sim")
}

#[test]
fn publishes_and_summarises_every_format() {
    let broker = Mosquitto::start().expect("mosquitto");
    for format in ["senml-cbor", "senml-json", "native-cbor", "native-json"] {
        let out = sim(&[
            "--broker",
            &broker.url(),
            "--devices",
            "3",
            "--count",
            "4",
            "--pack",
            "2",
            "--rate",
            "0",
            "--format",
            format,
            "--qos",
            "1",
            "--seed",
            "9",
            "--metrics",
            "3",
        ]);
        assert!(
            out.status.success(),
            "{format}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary = String::from_utf8_lossy(&out.stdout);
        // 3 devices x 4 samples in packs of 2 = 6 messages; x 3 metrics = 36 readings.
        for needle in [
            "\"devices\":3",
            "\"messages\":6",
            "\"readings\":36",
            "\"acked\":6",
        ] {
            assert!(
                summary.contains(needle),
                "{format}: {needle} not in {summary}"
            );
        }
        assert!(String::from_utf8_lossy(&out.stderr).contains("published 6 messages"));
    }
}

#[test]
fn rejects_bad_arguments_with_the_reason() {
    let out = sim(&["--count", "1", "--qos", "2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--qos"));
    let out = sim(&["--count", "1", "--format", "xml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("xml"));
}
