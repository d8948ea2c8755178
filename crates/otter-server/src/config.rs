//! Settings of one server process. `main.rs` fills them from flags and the
//! environment; tests build them directly (port 0, a temporary directory).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Default lifetime of a download link.
pub const DEFAULT_LINK_TTL: Duration = Duration::from_secs(3600);

/// Default largest package upload, in bytes (4 GiB).
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 4 << 30;

/// Everything `otter_server::run` needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Holds the PKI, the database, blobs, temporary files, `link.secret`,
    /// `admin.token` and `endpoints.json`.
    pub data_dir: PathBuf,
    /// Operator REST API (plain HTTP; loopback by default).
    pub api_addr: SocketAddr,
    /// Device HTTPS endpoint (mutual TLS).
    pub device_addr: SocketAddr,
    /// Embedded MQTT broker (TLS with client certificates).
    pub mqtt_addr: SocketAddr,
    /// Host names or addresses devices use to reach this server. The first one
    /// goes into URLs; all go into the server certificate. Empty means
    /// `127.0.0.1`.
    pub public_hosts: Vec<String>,
    /// Files holding the PEM public keys of trusted package signers.
    pub trusted_signers: Vec<PathBuf>,
    /// Files holding the PEM public keys of trusted offline root keys: a
    /// package whose signer carries a certificate from one is trusted.
    pub trusted_roots: Vec<PathBuf>,
    /// PEM files of the operator's own device CAs (the factory path): their
    /// device certificates are accepted for imported devices.
    pub device_cas: Vec<PathBuf>,
    /// Lifetime of a download link.
    pub link_ttl: Duration,
    /// Largest package upload accepted, in bytes.
    pub max_upload_bytes: u64,
    /// Chunk size, window and resend timeout of push mode.
    pub push: crate::push::PushSettings,
    /// Connection limits and timeouts of the device HTTPS endpoint.
    pub device_limits: crate::device_http::DeviceEndpointLimits,
}

impl ServerConfig {
    /// Defaults of the brief: API on 127.0.0.1:8080, device endpoint on
    /// 0.0.0.0:8443, MQTT on 0.0.0.0:8883.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        ServerConfig {
            data_dir: data_dir.into(),
            api_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080),
            device_addr: SocketAddr::new(any, 8443),
            mqtt_addr: SocketAddr::new(any, 8883),
            public_hosts: Vec::new(),
            trusted_signers: Vec::new(),
            trusted_roots: Vec::new(),
            device_cas: Vec::new(),
            link_ttl: DEFAULT_LINK_TTL,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            push: crate::push::PushSettings::default(),
            device_limits: crate::device_http::DeviceEndpointLimits::default(),
        }
    }

    /// Same, with every listener on an ephemeral loopback port (tests).
    pub fn ephemeral(data_dir: impl Into<PathBuf>) -> Self {
        let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        ServerConfig {
            api_addr: loopback,
            device_addr: loopback,
            mqtt_addr: loopback,
            ..ServerConfig::new(data_dir)
        }
    }

    /// The host name put into URLs given to devices.
    pub fn url_host(&self) -> String {
        let host = self
            .public_hosts
            .first()
            .map(String::as_str)
            .unwrap_or("127.0.0.1");
        // An IPv6 literal needs brackets inside a URL.
        if host.parse::<std::net::Ipv6Addr>().is_ok() {
            format!("[{host}]")
        } else {
            host.to_owned()
        }
    }
}

/// Where a listener can be reached from this machine: the bound address with
/// an unspecified IP (`0.0.0.0`, `::`) replaced by loopback.
pub fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_host_defaults_and_brackets() {
        let mut config = ServerConfig::new("/tmp/x");
        assert_eq!(config.url_host(), "127.0.0.1");
        config.public_hosts = vec!["::1".into(), "b".into()];
        assert_eq!(config.url_host(), "[::1]");
        config.public_hosts = vec!["ota.example".into()];
        assert_eq!(config.url_host(), "ota.example");
    }

    #[test]
    fn unspecified_becomes_loopback() {
        assert_eq!(
            connectable("0.0.0.0:8443".parse().unwrap()),
            "127.0.0.1:8443".parse().unwrap()
        );
        assert_eq!(
            connectable("[::]:1".parse().unwrap()),
            "[::1]:1".parse().unwrap()
        );
        assert_eq!(
            connectable("10.0.0.1:2".parse().unwrap()),
            "10.0.0.1:2".parse().unwrap()
        );
    }
}
