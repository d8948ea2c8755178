//! What a benchmark run found, and its three renderings: `results.json`
//! (serde, everything), `results.md` (the tables the README and
//! `docs/benchmarks.md` show) and `installed.svg` (devices installed over
//! time, one line per mode, written by hand: a step line per mode needs no
//! plotting crate).

use std::fmt::Write as _;

use serde::Serialize;

use super::metrics::BytesSent;
use super::timings::Percentiles;

/// The machine the run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_bytes: u64,
    pub open_files_limit: u64,
}

impl Machine {
    pub fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .unwrap_or(0);
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            cpu_model,
            memory_bytes: memory_kib * 1024,
            open_files_limit: crate::limits::raise_open_files_limit(),
        }
    }
}

/// The settings of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub devices: usize,
    pub payload_bytes: u64,
    pub modes: Vec<String>,
    pub hosts: Vec<String>,
    pub poll_interval_secs: f64,
    pub idle_window_secs: f64,
    pub connect_rate: u32,
}

/// The idle cost of a connected fleet with nothing pending.
#[derive(Debug, Clone, Serialize)]
pub struct IdleCost {
    pub window_secs: f64,
    pub server_cpu_seconds: f64,
    pub server_cpu_seconds_per_device_hour: f64,
    /// `None` when the server has no byte counters.
    pub server_bytes_sent: Option<u64>,
    pub server_bytes_per_device_hour: Option<f64>,
    /// Resident memory of the server at the end of the idle window.
    pub server_rss_bytes: u64,
}

/// One mode's run.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub mode: String,
    pub devices: usize,
    /// Package artifact size (what each device must receive).
    pub artifact_bytes: u64,
    /// From the first device started to all registered.
    pub connect_secs: f64,
    pub idle: IdleCost,
    pub notified: Percentiles,
    pub downloaded: Percentiles,
    pub installed: Percentiles,
    pub installed_devices: u64,
    pub failed_devices: u64,
    /// Commit to the deployment's last device done, by the bench's clock.
    pub deployment_secs: f64,
    pub bytes_sent: Option<BytesSent>,
    /// Bytes sent / (devices × artifact size).
    pub bytes_per_artifact_byte: Option<f64>,
    pub peak_concurrent_downloads: Option<u64>,
    pub notifications: Option<u64>,
    /// Server CPU from commit to done.
    pub server_cpu_seconds: f64,
    /// Peak resident memory of the server process (this mode only: each
    /// mode runs a fresh server).
    pub server_peak_rss_bytes: u64,
    /// Seconds after commit at which each device installed, sorted.
    pub installed_curve: Vec<f64>,
    /// The server restarted under the connected fleet (MQTT modes only).
    pub reconnect: Option<ReconnectStorm>,
}

/// A server restart under a connected fleet: how long until every device
/// registered again.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ReconnectStorm {
    /// From the new server process's start to the last re-registration.
    pub secs_after_start: f64,
    /// From the SIGTERM to the old process to the last re-registration.
    pub secs_after_stop: f64,
    /// Devices that registered again (all of them unless it timed out).
    pub reregistered: usize,
}

/// A baseline figure and Otter's figure beside it.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub name: String,
    pub baseline: String,
    pub otter: String,
    /// Otter relative to the baseline, oriented so that higher is better
    /// for Otter; `None` when a side was not measured.
    pub ratio: Option<f64>,
    pub note: String,
}

/// One of the issue's targets.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    /// `None`: not measured in this run.
    pub met: Option<bool>,
}

/// Everything a run found.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResults {
    pub started_at: String,
    pub command: String,
    pub machine: Machine,
    pub settings: Settings,
    pub modes: Vec<ModeResult>,
    pub baselines: Vec<Comparison>,
    pub targets: Vec<TargetCheck>,
}

fn seconds(value: f64) -> String {
    if value < 1.0 {
        format!("{:.0} ms", value * 1000.0)
    } else {
        format!("{value:.2} s")
    }
}

/// Bytes in B, KiB, MiB or GiB.
pub fn bytes(value: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = value;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let name = UNITS.get(unit).copied().unwrap_or("B");
    if unit == 0 {
        format!("{value:.0} {name}")
    } else {
        format!("{value:.1} {name}")
    }
}

fn optional<T>(value: Option<T>, show: impl Fn(T) -> String) -> String {
    value.map_or_else(|| "not measured".to_owned(), show)
}

/// The Markdown report: settings, one table with a column per mode, the
/// baselines and the targets.
pub fn markdown(results: &BenchResults) -> String {
    let mut out = String::new();
    let settings = &results.settings;
    let _ = writeln!(
        out,
        "{} devices per mode, payload {} (random), modes {}, pull poll interval {}, \
         idle window {}, devices spread over {} server address(es).\n",
        settings.devices,
        bytes(settings.payload_bytes as f64),
        settings.modes.join(", "),
        seconds(settings.poll_interval_secs),
        seconds(settings.idle_window_secs),
        settings.hosts.len().max(1),
    );
    let _ = writeln!(
        out,
        "Machine: {} CPUs ({}), {} memory, open-files limit {}.\n",
        results.machine.cpus,
        results.machine.cpu_model,
        bytes(results.machine.memory_bytes as f64),
        results.machine.open_files_limit,
    );
    let modes = &results.modes;
    let header: Vec<&str> = modes.iter().map(|m| m.mode.as_str()).collect();
    let _ = writeln!(out, "| | {} |", header.join(" | "));
    let _ = writeln!(out, "|---|{}", "---|".repeat(modes.len()));
    let mut row = |name: &str, cell: &dyn Fn(&ModeResult) -> String| {
        let cells: Vec<String> = modes.iter().map(cell).collect();
        let _ = writeln!(out, "| {name} | {} |", cells.join(" | "));
    };
    let triple = |p: &Percentiles| {
        format!(
            "{} / {} / {}",
            seconds(p.p50),
            seconds(p.p99),
            seconds(p.max)
        )
    };
    row("all registered after start", &|m| seconds(m.connect_secs));
    row("commit → notified p50 / p99 / max", &|m| {
        triple(&m.notified)
    });
    row("commit → downloaded p50 / p99 / max", &|m| {
        triple(&m.downloaded)
    });
    row("commit → installed p50 / p99 / max", &|m| {
        triple(&m.installed)
    });
    row("installed / failed", &|m| {
        format!("{} / {}", m.installed_devices, m.failed_devices)
    });
    row("server bytes sent (deployment)", &|m| {
        optional(m.bytes_sent, |b| bytes(b.total as f64))
    });
    row("… payload / overhead", &|m| {
        optional(m.bytes_sent, |b| {
            format!("{} / {}", bytes(b.payload as f64), bytes(b.overhead as f64))
        })
    });
    row("bytes sent ÷ (N × artifact)", &|m| {
        optional(m.bytes_per_artifact_byte, |r| format!("{r:.4}"))
    });
    row("peak concurrent downloads", &|m| {
        optional(m.peak_concurrent_downloads, |p| p.to_string())
    });
    row("server CPU (deployment)", &|m| {
        format!("{:.2} s", m.server_cpu_seconds)
    });
    row("server peak RSS", &|m| {
        bytes(m.server_peak_rss_bytes as f64)
    });
    row("idle: server RSS, all connected", &|m| {
        bytes(m.idle.server_rss_bytes as f64)
    });
    row("idle: server CPU per device-hour", &|m| {
        format!("{:.3} s", m.idle.server_cpu_seconds_per_device_hour)
    });
    row("idle: server bytes per device-hour", &|m| {
        optional(m.idle.server_bytes_per_device_hour, bytes)
    });
    row(
        "restart: all re-registered after start / stop",
        &|m| match m.reconnect {
            Some(storm) if storm.reregistered == m.devices => format!(
                "{} / {}",
                seconds(storm.secs_after_start),
                seconds(storm.secs_after_stop)
            ),
            Some(storm) => format!("only {} of {}", storm.reregistered, m.devices),
            None => "n/a (no session)".to_owned(),
        },
    );

    let _ = writeln!(
        out,
        "\nBytes are the server's own counters (`/metrics`): device HTTPS at the socket \
         (TLS included) plus MQTT PUBLISH packets. The embedded broker exposes no wire \
         counters, so MQTT keepalives (a 2-byte PINGRESP in a 22-byte TLS record every \
         30 s, about 2.8 KiB per device-hour), PUBACKs and TLS records around publishes \
         are not in them: an MQTT fleet's idle bytes read 0 here."
    );
    if !results.baselines.is_empty() {
        let _ = writeln!(
            out,
            "\n| baseline | baseline figure | Otter | Otter ÷ baseline | note |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|");
        for comparison in &results.baselines {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                comparison.name,
                comparison.baseline,
                comparison.otter,
                optional(comparison.ratio, |r| format!("{r:.2}")),
                comparison.note
            );
        }
    }
    if !results.targets.is_empty() {
        let _ = writeln!(out, "\n| target | measured | met |");
        let _ = writeln!(out, "|---|---|---|");
        for target in &results.targets {
            let met = match target.met {
                Some(true) => "met",
                Some(false) => "**not met**",
                None => "not measured",
            };
            let _ = writeln!(out, "| {} | {} | {met} |", target.target, target.measured);
        }
    }
    out
}

/// Line colours, one per mode in order.
const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// `installed.svg`: devices installed (y) against seconds after commit (x),
/// a step line per mode.
pub fn installed_svg(modes: &[ModeResult]) -> String {
    let (width, height) = (720.0, 400.0);
    let (left, right, top, bottom) = (70.0, 20.0, 30.0, 50.0);
    let plot_width = width - left - right;
    let plot_height = height - top - bottom;
    let max_time = modes
        .iter()
        .filter_map(|m| m.installed_curve.last().copied())
        .fold(0.0f64, f64::max)
        .max(0.001);
    let max_devices = modes.iter().map(|m| m.devices).max().unwrap_or(1).max(1) as f64;
    let x = |seconds: f64| left + seconds / max_time * plot_width;
    let y = |devices: f64| top + plot_height - devices / max_devices * plot_height;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="18" text-anchor="middle" font-size="14">Devices installed after commit</text>"#,
        width / 2.0
    );
    // Axes with five ticks each.
    let _ = writeln!(
        svg,
        r##"<path d="M{left},{top} V{} H{}" stroke="#333" fill="none"/>"##,
        top + plot_height,
        left + plot_width
    );
    for tick in 0..=5 {
        let fraction = f64::from(tick) / 5.0;
        let tx = left + fraction * plot_width;
        let ty = top + plot_height - fraction * plot_height;
        let _ = writeln!(
            svg,
            r##"<line x1="{tx:.1}" y1="{0:.1}" x2="{tx:.1}" y2="{1:.1}" stroke="#333"/><text x="{tx:.1}" y="{2:.1}" text-anchor="middle">{3}</text>"##,
            top + plot_height,
            top + plot_height + 5.0,
            top + plot_height + 18.0,
            format_tick(fraction * max_time)
        );
        let _ = writeln!(
            svg,
            r##"<line x1="{0:.1}" y1="{ty:.1}" x2="{left}" y2="{ty:.1}" stroke="#333"/><text x="{1:.1}" y="{2:.1}" text-anchor="end">{3:.0}</text><line x1="{left}" y1="{ty:.1}" x2="{4:.1}" y2="{ty:.1}" stroke="#eee"/>"##,
            left - 5.0,
            left - 8.0,
            ty + 4.0,
            fraction * max_devices,
            left + plot_width
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds after commit</text>"#,
        left + plot_width / 2.0,
        height - 10.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">devices installed</text>"#,
        top + plot_height / 2.0,
        top + plot_height / 2.0
    );
    for (index, mode) in modes.iter().enumerate() {
        let colour = COLOURS
            .get(index % COLOURS.len())
            .copied()
            .unwrap_or("#000");
        let mut path = format!("M{:.1},{:.1}", x(0.0), y(0.0));
        for (count, seconds) in mode.installed_curve.iter().enumerate() {
            let _ = write!(path, " H{:.1} V{:.1}", x(*seconds), y((count + 1) as f64));
        }
        let _ = writeln!(
            svg,
            r#"<path d="{path}" stroke="{colour}" stroke-width="2" fill="none"/>"#
        );
        let legend_y = top + 15.0 + index as f64 * 16.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{0:.1}" y1="{legend_y:.1}" x2="{1:.1}" y2="{legend_y:.1}" stroke="{colour}" stroke-width="3"/><text x="{2:.1}" y="{3:.1}">{4} ({5} devices)</text>"#,
            left + plot_width - 170.0,
            left + plot_width - 150.0,
            left + plot_width - 144.0,
            legend_y + 4.0,
            mode.mode,
            mode.installed_curve.len()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn format_tick(seconds: f64) -> String {
    if seconds >= 10.0 {
        format!("{seconds:.0}")
    } else {
        format!("{seconds:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(name: &str, curve: Vec<f64>) -> ModeResult {
        ModeResult {
            mode: name.to_owned(),
            devices: curve.len(),
            artifact_bytes: 1000,
            connect_secs: 1.0,
            idle: IdleCost {
                window_secs: 10.0,
                server_cpu_seconds: 0.1,
                server_cpu_seconds_per_device_hour: 0.01,
                server_bytes_sent: None,
                server_bytes_per_device_hour: None,
                server_rss_bytes: 1 << 20,
            },
            notified: Percentiles::of_sorted(&curve),
            downloaded: Percentiles::of_sorted(&curve),
            installed: Percentiles::of_sorted(&curve),
            installed_devices: curve.len() as u64,
            failed_devices: 0,
            deployment_secs: 2.0,
            bytes_sent: None,
            bytes_per_artifact_byte: None,
            peak_concurrent_downloads: Some(3),
            notifications: None,
            server_cpu_seconds: 0.5,
            server_peak_rss_bytes: 50 << 20,
            installed_curve: curve,
            reconnect: None,
        }
    }

    #[test]
    fn renders_a_table_and_a_chart() {
        let results = BenchResults {
            started_at: "now".into(),
            command: "otter-sim bench".into(),
            machine: Machine {
                cpus: 2,
                cpu_model: "cpu".into(),
                memory_bytes: 1 << 30,
                open_files_limit: 20_000,
            },
            settings: Settings {
                devices: 3,
                payload_bytes: 1 << 20,
                modes: vec!["push".into(), "pull".into()],
                hosts: vec![],
                poll_interval_secs: 5.0,
                idle_window_secs: 10.0,
                connect_rate: 100,
            },
            modes: vec![
                mode("push", vec![0.5, 1.0, 2.0]),
                mode("pull", vec![3.0, 4.0, 5.0]),
            ],
            baselines: vec![],
            targets: vec![TargetCheck {
                target: "t".into(),
                measured: "m".into(),
                met: None,
            }],
        };
        let text = markdown(&results);
        assert!(text.contains("| | push | pull |"), "{text}");
        assert!(text.contains("| commit → installed p50 / p99 / max | 1.00 s / 2.00 s / 2.00 s | 4.00 s / 5.00 s / 5.00 s |"), "{text}");
        assert!(text.contains("| t | m | not measured |"));
        let svg = installed_svg(&results.modes);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(
            svg.matches("stroke-width=\"2\"").count(),
            2,
            "one line per mode"
        );
        assert!(svg.contains("pull (3 devices)"));
    }

    #[test]
    fn units() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
        assert_eq!(seconds(0.25), "250 ms");
        assert_eq!(seconds(2.0), "2.00 s");
    }
}
