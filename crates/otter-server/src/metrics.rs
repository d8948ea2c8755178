//! Process-wide counters of what the server sends and serves, exposed as
//! Prometheus text at `GET /metrics` on the operator API address.
//!
//! The counters are plain atomics in one static ([`metrics`]): incrementing
//! one is a single relaxed `fetch_add` with no lock and no allocation, so the
//! hot paths (every TLS write of the device endpoint, every MQTT publish) pay
//! nothing measurable. They are process-wide, like the exporters of the
//! `metrics` crate: one server per process is the deployment model, and
//! several servers in one test process simply add up.
//!
//! Layout: [`ServerMetrics`] (the counters) and [`metrics`]; the helpers the
//! counting sites use ([`CountingStream`] at the device socket,
//! [`CountedDownload`] for download bodies, [`mqtt_publish_packet_size`]);
//! [`render`], which writes the exposition text, with the process figures
//! read from `/proc/self` at scrape time.
//!
//! What is counted where (README "Metrics" documents each name):
//! - device HTTPS bytes at the TCP socket, below TLS, so handshakes, records
//!   and HTTP headers are all included (`device_http::serve`);
//! - artifact bytes as the download body hands them to hyper (`device_http`);
//! - MQTT publishes of the server, payload and encoded PUBLISH packet
//!   (`broker`). rmqtt exposes no per-connection byte counters and owns its
//!   sockets, so the broker's wire bytes are not measured: TLS records (22
//!   bytes of overhead each in TLS 1.3), PUBACKs and keepalives come on top
//!   of `otter_mqtt_published_packet_bytes_total`;
//! - notifications by channel (`notify`, `push`), push chunks (`push`),
//!   registrations by channel (`broker`, `device_http`).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use otter_proto::api::Channel;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }

    pub fn add(&self, amount: u64) {
        // Relaxed: each counter is independent and read only for reporting.
        self.0.fetch_add(amount, Ordering::Relaxed);
    }

    pub fn increment(&self) {
        self.add(1);
    }

    pub fn value(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down, with the highest value it reached.
#[derive(Debug, Default)]
pub struct Gauge {
    current: AtomicU64,
    peak: AtomicU64,
}

impl Gauge {
    pub const fn new() -> Self {
        Gauge {
            current: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    pub fn increment(&self) {
        let now = self.current.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// Never goes below zero, so a mismatched decrement cannot wrap.
    pub fn decrement(&self) {
        let _ = self
            .current
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |value| {
                Some(value.saturating_sub(1))
            });
    }

    pub fn value(&self) -> u64 {
        self.current.load(Ordering::Relaxed)
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

/// Every counter of the server. See the README's "Metrics" section.
#[derive(Debug, Default)]
pub struct ServerMetrics {
    pub device_connections_accepted: Counter,
    pub device_connections_open: Gauge,
    pub device_bytes_written: Counter,
    pub device_bytes_read: Counter,
    pub artifact_bytes_served: Counter,
    pub downloads_started: Counter,
    pub downloads_completed: Counter,
    pub downloads_in_flight: Gauge,
    pub polls: Counter,
    pub polls_not_modified: Counter,
    pub registrations_mqtt: Counter,
    pub registrations_poll: Counter,
    pub notifications_mqtt: Counter,
    pub notifications_poll: Counter,
    pub notifications_push: Counter,
    pub push_chunks_sent: Counter,
    pub push_chunk_bytes: Counter,
    pub mqtt_published_messages: Counter,
    pub mqtt_published_payload_bytes: Counter,
    pub mqtt_published_packet_bytes: Counter,
    pub mqtt_received_messages: Counter,
    pub mqtt_received_payload_bytes: Counter,
    pub mqtt_connects: Counter,
    pub mqtt_disconnects: Counter,
}

impl ServerMetrics {
    pub const fn new() -> Self {
        ServerMetrics {
            device_connections_accepted: Counter::new(),
            device_connections_open: Gauge::new(),
            device_bytes_written: Counter::new(),
            device_bytes_read: Counter::new(),
            artifact_bytes_served: Counter::new(),
            downloads_started: Counter::new(),
            downloads_completed: Counter::new(),
            downloads_in_flight: Gauge::new(),
            polls: Counter::new(),
            polls_not_modified: Counter::new(),
            registrations_mqtt: Counter::new(),
            registrations_poll: Counter::new(),
            notifications_mqtt: Counter::new(),
            notifications_poll: Counter::new(),
            notifications_push: Counter::new(),
            push_chunks_sent: Counter::new(),
            push_chunk_bytes: Counter::new(),
            mqtt_published_messages: Counter::new(),
            mqtt_published_payload_bytes: Counter::new(),
            mqtt_published_packet_bytes: Counter::new(),
            mqtt_received_messages: Counter::new(),
            mqtt_received_payload_bytes: Counter::new(),
            mqtt_connects: Counter::new(),
            mqtt_disconnects: Counter::new(),
        }
    }

    /// Counts a registration received over `channel`.
    pub fn registration(&self, channel: Channel) {
        match channel {
            Channel::Mqtt => self.registrations_mqtt.increment(),
            Channel::Poll => self.registrations_poll.increment(),
        }
    }

    /// Counts a link notification delivered over `channel`.
    pub fn notification(&self, channel: Channel) {
        match channel {
            Channel::Mqtt => self.notifications_mqtt.increment(),
            Channel::Poll => self.notifications_poll.increment(),
        }
    }

    /// Counts one server publish that reached a session.
    pub fn mqtt_published(&self, topic_length: usize, payload_length: usize) {
        self.mqtt_published_messages.increment();
        self.mqtt_published_payload_bytes.add(payload_length as u64);
        self.mqtt_published_packet_bytes
            .add(mqtt_publish_packet_size(topic_length, payload_length));
    }
}

static METRICS: ServerMetrics = ServerMetrics::new();

/// The process's counters.
pub fn metrics() -> &'static ServerMetrics {
    &METRICS
}

/// Size of an MQTT 3.1.1 QoS 1 PUBLISH packet as encoded on the wire (before
/// TLS): fixed header byte, remaining-length varint, topic length prefix and
/// topic, packet id, payload.
pub fn mqtt_publish_packet_size(topic_length: usize, payload_length: usize) -> u64 {
    let remaining = 2 + topic_length as u64 + 2 + payload_length as u64;
    let length_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + length_bytes + remaining
}

/// An accepted connection that counts the bytes read from and written to it
/// into the device endpoint's counters, and the connection as open while it
/// lives. Wraps the TCP stream, under TLS, so the counts are what crossed
/// the socket.
#[derive(Debug)]
pub struct CountingStream<S> {
    inner: S,
}

impl<S> CountingStream<S> {
    pub fn new(inner: S) -> Self {
        let metrics = metrics();
        metrics.device_connections_accepted.increment();
        metrics.device_connections_open.increment();
        CountingStream { inner }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S> Drop for CountingStream<S> {
    fn drop(&mut self) {
        metrics().device_connections_open.decrement();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountingStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buffer.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(context, buffer);
        if let Poll::Ready(Ok(())) = result {
            let read = buffer.filled().len().saturating_sub(before);
            metrics().device_bytes_read.add(read as u64);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountingStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(context, data);
        if let Poll::Ready(Ok(written)) = result {
            metrics().device_bytes_written.add(written as u64);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(context, buffers);
        if let Poll::Ready(Ok(written)) = result {
            metrics().device_bytes_written.add(written as u64);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(context)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(context)
    }
}

/// One download response body in flight: counted in
/// `otter_downloads_in_flight` from creation until dropped (sent completely,
/// or the connection went away); [`DownloadGuard::finished`] counts it
/// completed.
#[derive(Debug)]
pub struct DownloadGuard {
    _private: (),
}

impl DownloadGuard {
    pub fn start() -> Self {
        let metrics = metrics();
        metrics.downloads_started.increment();
        metrics.downloads_in_flight.increment();
        DownloadGuard { _private: () }
    }

    /// Counts `bytes` of artifact handed to the connection.
    pub fn served(&self, bytes: usize) {
        metrics().artifact_bytes_served.add(bytes as u64);
    }

    /// The body reached its end.
    pub fn finished(&self) {
        metrics().downloads_completed.increment();
    }
}

impl Drop for DownloadGuard {
    fn drop(&mut self) {
        metrics().downloads_in_flight.decrement();
    }
}

/// A download body: passes the artifact's pieces through, counting them in
/// `otter_artifact_bytes_served_total`, and the download in flight while it
/// lives. It is complete once `length` bytes went through: hyper stops
/// polling a body at its `Content-Length`, so the end of the stream may
/// never be seen.
#[derive(Debug)]
pub struct CountedDownload<S> {
    inner: S,
    guard: DownloadGuard,
    remaining: u64,
}

impl<S> CountedDownload<S> {
    pub fn new(inner: S, length: u64) -> Self {
        CountedDownload {
            inner,
            guard: DownloadGuard::start(),
            remaining: length,
        }
    }
}

impl<S: Stream<Item = io::Result<Bytes>> + Unpin> Stream for CountedDownload<S> {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let result = Pin::new(&mut self.inner).poll_next(context);
        if let Poll::Ready(Some(Ok(piece))) = &result {
            let length = piece.len() as u64;
            self.guard.served(piece.len());
            let was_remaining = self.remaining;
            self.remaining = was_remaining.saturating_sub(length);
            if was_remaining > 0 && self.remaining == 0 {
                self.guard.finished();
            }
        }
        result
    }
}

/// Figures of this process from `/proc/self` (Linux); `None` elsewhere.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ProcessFigures {
    cpu_seconds: f64,
    resident_bytes: u64,
    resident_peak_bytes: u64,
}

fn process_figures() -> Option<ProcessFigures> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_process_figures(&status, &stat, clock_ticks_per_second())
}

/// Linux reports CPU time in clock ticks, 100 per second on every
/// architecture Rust supports there (`USER_HZ`).
fn clock_ticks_per_second() -> f64 {
    100.0
}

/// Parses `VmRSS`/`VmHWM` (kB) from `/proc/self/status` and utime + stime
/// (fields 14 and 15) from `/proc/self/stat`.
fn parse_process_figures(
    status: &str,
    stat: &str,
    ticks_per_second: f64,
) -> Option<ProcessFigures> {
    let kilobytes = |key: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|number| number.trim().parse::<u64>().ok())
            .map(|value| value * 1024)
    };
    // The command name (field 2) is in parentheses and may hold spaces:
    // count fields after the last ')'. utime is field 14, i.e. the 12th
    // after the name (state is the 1st).
    let after_name = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = after_name.split_whitespace().skip(11);
    let user_ticks: u64 = fields.next()?.parse().ok()?;
    let system_ticks: u64 = fields.next()?.parse().ok()?;
    Some(ProcessFigures {
        cpu_seconds: (user_ticks + system_ticks) as f64 / ticks_per_second,
        resident_bytes: kilobytes("VmRSS:")?,
        resident_peak_bytes: kilobytes("VmHWM:")?,
    })
}

/// The Prometheus text exposition (format 0.0.4) of every counter.
pub fn render() -> String {
    use std::fmt::Write as _;
    let metrics = metrics();
    let mut text = String::with_capacity(4096);
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, String)]| {
        // Writing to a String cannot fail.
        let _ = writeln!(text, "# HELP {name} {help}");
        let _ = writeln!(text, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(text, "{name}{labels} {value}");
        }
    };
    let one = |value: u64| [("", value.to_string())];

    family(
        "otter_device_connections_accepted_total",
        "counter",
        "TCP connections accepted by the device HTTPS endpoint.",
        &one(metrics.device_connections_accepted.value()),
    );
    family(
        "otter_device_connections_open",
        "gauge",
        "Device HTTPS connections open now.",
        &one(metrics.device_connections_open.value()),
    );
    family(
        "otter_device_connections_open_peak",
        "gauge",
        "Most device HTTPS connections open at once since the start.",
        &one(metrics.device_connections_open.peak()),
    );
    family(
        "otter_device_bytes_written_total",
        "counter",
        "Bytes written to device HTTPS connections at the TCP socket (TLS, HTTP and payload).",
        &one(metrics.device_bytes_written.value()),
    );
    family(
        "otter_device_bytes_read_total",
        "counter",
        "Bytes read from device HTTPS connections at the TCP socket.",
        &one(metrics.device_bytes_read.value()),
    );
    family(
        "otter_artifact_bytes_served_total",
        "counter",
        "Artifact bytes handed to download response bodies.",
        &one(metrics.artifact_bytes_served.value()),
    );
    family(
        "otter_downloads_started_total",
        "counter",
        "Download responses (200 or 206) started.",
        &one(metrics.downloads_started.value()),
    );
    family(
        "otter_downloads_completed_total",
        "counter",
        "Download responses whose body was sent to its end.",
        &one(metrics.downloads_completed.value()),
    );
    family(
        "otter_downloads_in_flight",
        "gauge",
        "Download responses being sent now.",
        &one(metrics.downloads_in_flight.value()),
    );
    family(
        "otter_downloads_in_flight_peak",
        "gauge",
        "Most download responses in flight at once since the start.",
        &one(metrics.downloads_in_flight.peak()),
    );
    family(
        "otter_polls_total",
        "counter",
        "Polls (POST /v1/poll) received with a well-formed registration.",
        &one(metrics.polls.value()),
    );
    family(
        "otter_polls_not_modified_total",
        "counter",
        "Polls answered 304 Not Modified (nothing new).",
        &one(metrics.polls_not_modified.value()),
    );
    family(
        "otter_registrations_total",
        "counter",
        "Device registrations received, by channel (every poll carries one).",
        &[
            (
                "{channel=\"mqtt\"}",
                metrics.registrations_mqtt.value().to_string(),
            ),
            (
                "{channel=\"poll\"}",
                metrics.registrations_poll.value().to_string(),
            ),
        ],
    );
    family(
        "otter_notifications_sent_total",
        "counter",
        "Update notifications delivered (notification.sent), by channel.",
        &[
            (
                "{channel=\"mqtt\"}",
                metrics.notifications_mqtt.value().to_string(),
            ),
            (
                "{channel=\"poll\"}",
                metrics.notifications_poll.value().to_string(),
            ),
            (
                "{channel=\"push\"}",
                metrics.notifications_push.value().to_string(),
            ),
        ],
    );
    family(
        "otter_push_chunks_sent_total",
        "counter",
        "Push-mode chunks published, resends included.",
        &one(metrics.push_chunks_sent.value()),
    );
    family(
        "otter_push_chunk_bytes_total",
        "counter",
        "Artifact bytes carried by push-mode chunks, resends included.",
        &one(metrics.push_chunk_bytes.value()),
    );
    family(
        "otter_mqtt_published_messages_total",
        "counter",
        "MQTT messages the server published that reached a device session.",
        &one(metrics.mqtt_published_messages.value()),
    );
    family(
        "otter_mqtt_published_payload_bytes_total",
        "counter",
        "Payload bytes of those messages.",
        &one(metrics.mqtt_published_payload_bytes.value()),
    );
    family(
        "otter_mqtt_published_packet_bytes_total",
        "counter",
        "Those messages as encoded QoS 1 PUBLISH packets (before TLS; PUBACKs, keepalives and TLS records not included).",
        &one(metrics.mqtt_published_packet_bytes.value()),
    );
    family(
        "otter_mqtt_received_messages_total",
        "counter",
        "MQTT messages received from devices on their own topics.",
        &one(metrics.mqtt_received_messages.value()),
    );
    family(
        "otter_mqtt_received_payload_bytes_total",
        "counter",
        "Payload bytes of those messages.",
        &one(metrics.mqtt_received_payload_bytes.value()),
    );
    family(
        "otter_mqtt_connects_total",
        "counter",
        "MQTT device sessions connected.",
        &one(metrics.mqtt_connects.value()),
    );
    family(
        "otter_mqtt_disconnects_total",
        "counter",
        "MQTT device sessions disconnected.",
        &one(metrics.mqtt_disconnects.value()),
    );
    if let Some(process) = process_figures() {
        family(
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time of the server process.",
            &[("", format!("{:.2}", process.cpu_seconds))],
        );
        family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of the server process.",
            &one(process.resident_bytes),
        );
        family(
            "process_resident_memory_peak_bytes",
            "gauge",
            "Peak resident memory of the server process (VmHWM).",
            &one(process.resident_peak_bytes),
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_packet_sizes() {
        // 2-byte topic length + topic + 2-byte packet id + payload, then the
        // fixed header byte and the remaining-length varint.
        assert_eq!(mqtt_publish_packet_size(10, 0), 1 + 1 + 14);
        assert_eq!(mqtt_publish_packet_size(10, 113), 1 + 1 + 127);
        assert_eq!(mqtt_publish_packet_size(10, 114), 1 + 2 + 128);
        assert_eq!(mqtt_publish_packet_size(40, 16_339), 1 + 2 + 16_383);
        assert_eq!(mqtt_publish_packet_size(40, 16_340), 1 + 3 + 16_384);
        assert_eq!(mqtt_publish_packet_size(40, 2_097_108), 1 + 4 + 2_097_152);
    }

    #[test]
    fn gauge_tracks_peak_and_never_wraps() {
        let gauge = Gauge::new();
        gauge.decrement();
        assert_eq!(gauge.value(), 0);
        gauge.increment();
        gauge.increment();
        gauge.decrement();
        assert_eq!((gauge.value(), gauge.peak()), (1, 2));
    }

    #[test]
    fn parses_proc_files() {
        let status = "Name:\tx\nVmHWM:\t   2048 kB\nVmRSS:\t    1024 kB\n";
        let stat = "42 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0";
        let figures = parse_process_figures(status, stat, 100.0).unwrap();
        assert_eq!(
            figures,
            ProcessFigures {
                cpu_seconds: 4.0,
                resident_bytes: 1024 * 1024,
                resident_peak_bytes: 2048 * 1024,
            }
        );
        assert_eq!(parse_process_figures("", stat, 100.0), None);
        assert_eq!(parse_process_figures(status, "garbage", 100.0), None);
    }

    #[test]
    fn renders_every_family_once() {
        let text = render();
        for name in [
            "otter_device_bytes_written_total",
            "otter_artifact_bytes_served_total",
            "otter_downloads_in_flight_peak",
            "otter_mqtt_published_packet_bytes_total",
        ] {
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name} in {text}"
            );
        }
        assert!(text.contains("otter_notifications_sent_total{channel=\"push\"} "));
    }
}
