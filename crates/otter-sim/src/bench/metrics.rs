//! The server's `GET /metrics` (Prometheus text) read into numbers, and the
//! figures the benchmark derives from two readings: bytes sent, split into
//! payload and protocol overhead, and peak concurrent downloads.
//!
//! Only what the benchmark needs of the text format is parsed: `name value`
//! and `name{labels} value` lines; comments are skipped, and the series of
//! one name are summed (e.g. notifications over every channel).

use std::collections::BTreeMap;

/// Sums per metric name of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSnapshot {
    values: BTreeMap<String, f64>,
}

impl MetricsSnapshot {
    pub fn parse(text: &str) -> MetricsSnapshot {
        let mut values = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = match line.rsplit_once(char::is_whitespace) {
                Some(parts) => parts,
                None => continue,
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series).trim();
            *values.entry(name.to_owned()).or_insert(0.0) += value;
        }
        MetricsSnapshot { values }
    }

    /// A metric's value (summed over its labels), if the server has it.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.values.get(name).copied()
    }

    /// `self - before` for a counter; `None` if either lacks it.
    pub fn delta(&self, before: &MetricsSnapshot, name: &str) -> Option<f64> {
        Some(self.value(name)? - before.value(name)?)
    }
}

/// Names of the server's counters (see `otter_server::metrics`).
pub mod names {
    /// Every byte written to device HTTPS sockets (TLS included).
    pub const DEVICE_BYTES_WRITTEN: &str = "otter_device_bytes_written_total";
    /// Artifact bytes handed to download responses.
    pub const ARTIFACT_BYTES_SERVED: &str = "otter_artifact_bytes_served_total";
    /// Encoded MQTT PUBLISH packets the broker sent for the server.
    pub const MQTT_PACKET_BYTES: &str = "otter_mqtt_published_packet_bytes_total";
    /// Artifact bytes inside push chunks.
    pub const PUSH_CHUNK_BYTES: &str = "otter_push_chunk_bytes_total";
    pub const DOWNLOADS_IN_FLIGHT_PEAK: &str = "otter_downloads_in_flight_peak";
    pub const NOTIFICATIONS: &str = "otter_notifications_sent_total";
    pub const POLLS: &str = "otter_polls_total";
}

/// Bytes the server sent between two scrapes.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BytesSent {
    /// Device HTTPS (at the socket, TLS included) + MQTT PUBLISH packets.
    pub total: u64,
    /// Artifact bytes (downloads and push chunks).
    pub payload: u64,
    /// `total - payload`: TLS, HTTP and MQTT framing, notifications, polls.
    pub overhead: u64,
    pub device_https: u64,
    pub mqtt_publish: u64,
}

impl BytesSent {
    /// From two scrapes; `None` when the server has no such counters.
    pub fn between(before: &MetricsSnapshot, after: &MetricsSnapshot) -> Option<BytesSent> {
        let device_https = after.delta(before, names::DEVICE_BYTES_WRITTEN)?;
        let mqtt_publish = after.delta(before, names::MQTT_PACKET_BYTES)?;
        let payload = after.delta(before, names::ARTIFACT_BYTES_SERVED)?
            + after.delta(before, names::PUSH_CHUNK_BYTES).unwrap_or(0.0);
        let total = device_https + mqtt_publish;
        Some(BytesSent {
            total: total as u64,
            payload: payload as u64,
            overhead: (total - payload).max(0.0) as u64,
            device_https: device_https as u64,
            mqtt_publish: mqtt_publish as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sums_and_deltas() {
        let before = MetricsSnapshot::parse(
            "# HELP x y\n# TYPE otter_notifications_sent_total counter\n\
             otter_notifications_sent_total{channel=\"mqtt\"} 3\n\
             otter_notifications_sent_total{channel=\"poll\"} 4\n\
             otter_device_bytes_written_total 100\n\
             otter_artifact_bytes_served_total 10\n\
             otter_mqtt_published_packet_bytes_total 50\n\
             bad line here\n",
        );
        assert_eq!(before.value(names::NOTIFICATIONS), Some(7.0));
        let after = MetricsSnapshot::parse(
            "otter_device_bytes_written_total 1100\n\
             otter_artifact_bytes_served_total 810\n\
             otter_mqtt_published_packet_bytes_total 150\n\
             otter_push_chunk_bytes_total 0\n",
        );
        let sent = BytesSent::between(&before, &after).unwrap();
        assert_eq!(sent.total, 1100);
        assert_eq!(sent.payload, 800);
        assert_eq!(sent.overhead, 300);
        assert_eq!(
            BytesSent::between(&before, &MetricsSnapshot::default()),
            None
        );
    }
}
