//! Alerts, from raised to told: analytics makes an [`Alert`] when a rule or
//! the detector changes state; the sink stores it in the `alerts` table and,
//! in the same transaction, sends its [`AlertNotice`] with PostgreSQL NOTIFY;
//! once committed, the intake publishes the same notice on MQTT under the
//! alert topic prefix. This module owns the alert, its JSON (one text for
//! NOTIFY and MQTT, always under NOTIFY's size limit) and where it is
//! published; the stages only carry it.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Value};

use crate::model::{format_rfc3339, Micros};

/// Largest alert JSON sent: PostgreSQL's NOTIFY refuses payloads of 8,000
/// bytes or more.
pub const MAX_NOTIFY_BYTES: usize = 7_900;

/// Raised or cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Raised,
    Cleared,
}

impl State {
    /// The state as stored and sent: `raised` or `cleared`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Raised => "raised",
            State::Cleared => "cleared",
        }
    }
}

/// One alert transition.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub time: Micros,
    pub device: Arc<str>,
    /// The metric, or "" for rules over a whole device (silence).
    pub metric: String,
    pub rule: String,
    pub state: State,
    pub value: Option<f64>,
    /// Context: window statistics, the detector's score, ... (a JSON object).
    pub detail: Value,
}

/// The JSON of an alert, as NOTIFY and MQTT carry it.
#[derive(Serialize)]
struct Json<'a> {
    time: String,
    device_id: &'a str,
    metric: &'a str,
    rule: &'a str,
    state: State,
    value: Option<f64>,
    detail: &'a Value,
}

/// The last resort when even the names pass the limit.
#[derive(Serialize)]
struct Short {
    time: String,
    state: State,
    truncated: bool,
}

impl Alert {
    /// The detail as stored in the `alerts` table's `jsonb` column.
    pub fn detail_text(&self) -> String {
        self.detail.to_string()
    }

    /// What is told of the alert once it is committed.
    pub fn notice(&self) -> AlertNotice {
        AlertNotice {
            device: self.device.clone(),
            json: self.to_json(),
        }
    }

    /// The JSON sent on NOTIFY and MQTT, always under [`MAX_NOTIFY_BYTES`]:
    /// when the detail would pass it, the detail is left out and
    /// `"truncated": true` says so (the `alerts` table keeps all of it).
    pub fn to_json(&self) -> String {
        let full = self.json_with(&self.detail);
        if full.len() <= MAX_NOTIFY_BYTES {
            return full;
        }
        let short = self.json_with(&json!({ "truncated": true }));
        if short.len() <= MAX_NOTIFY_BYTES {
            return short;
        }
        // Names are bounded by `[limits]`, so this is a last resort.
        serde_json::to_string(&Short {
            time: format_rfc3339(self.time),
            state: self.state,
            truncated: true,
        })
        .unwrap_or_default()
    }

    fn json_with(&self, detail: &Value) -> String {
        serde_json::to_string(&Json {
            time: format_rfc3339(self.time),
            device_id: &self.device,
            metric: &self.metric,
            rule: &self.rule,
            state: self.state,
            value: self.value.filter(|v| v.is_finite()),
            detail,
        })
        .unwrap_or_default()
    }
}

/// A committed alert as told: its device and JSON. The same text goes out
/// with NOTIFY (inside the commit) and on MQTT (after it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertNotice {
    pub device: Arc<str>,
    pub json: String,
}

impl AlertNotice {
    /// The MQTT topic the notice is published on (QoS 1, not retained):
    /// `prefix` followed by the device id; `None` when `prefix` is empty
    /// (publication off).
    pub fn topic(&self, prefix: &str) -> Option<String> {
        (!prefix.is_empty()).then(|| format!("{prefix}{}", self.device))
    }
}

/// A JSON number, or null for NaN and infinities (JSON has neither).
pub fn finite(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(detail: Value) -> Alert {
        Alert {
            time: 0,
            device: Arc::from("d\"1"),
            metric: "m".into(),
            rule: "r".into(),
            state: State::Raised,
            value: Some(f64::NAN),
            detail,
        }
    }

    #[test]
    fn json_is_escaped_and_non_finite_values_are_null() {
        let a = alert(json!({ "k": 1 }));
        let v: Value = serde_json::from_str(&a.to_json()).unwrap_or_default();
        assert_eq!(v["device_id"], "d\"1");
        assert_eq!(v["state"], "raised");
        assert_eq!(v["value"], Value::Null);
        assert_eq!(v["detail"]["k"], 1);
        assert_eq!(v["time"], "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn alert_json_stays_under_the_notify_limit() {
        let mut a = alert(json!({ "k": 1 }));
        assert!(a.to_json().contains("\"k\":1"));
        a.detail = json!({ "k": "x".repeat(10_000) });
        let json = a.to_json();
        assert!(json.len() <= MAX_NOTIFY_BYTES, "{}", json.len());
        assert!(json.contains("\"truncated\":true") && json.contains("\"device_id\":\"d\\\"1\""));
        a.rule = "r".repeat(10_000);
        let json = a.to_json();
        assert!(json.len() <= MAX_NOTIFY_BYTES, "{}", json.len());
        let v: Value = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(v["state"], "raised");
        assert_eq!(v["truncated"], true);
    }

    #[test]
    fn notices_go_to_the_device_topic_unless_publication_is_off() {
        let n = alert(json!({})).notice();
        assert_eq!(n.topic("alerts/").as_deref(), Some("alerts/d\"1"));
        assert_eq!(n.topic(""), None);
    }
}
