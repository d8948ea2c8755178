//! Bytes on the wire of a server whose sockets we cannot wrap (the embedded
//! rmqtt broker, Mosquitto): the kernel's per-connection counters, read with
//! `ss -tin` (iproute2) for the established TCP connections on a local port.
//!
//! The figures cover the connections open when read: take them at the end
//! of a run while the clients are still connected. They include everything
//! TCP carried — TLS handshakes and records, MQTT headers, PUBACKs,
//! keepalives — which is what the server's own counters cannot see.

use anyhow::Context;
use serde::Serialize;

/// Sums over the established connections of one local port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SocketTotals {
    pub connections: u64,
    /// Bytes the server sent (`bytes_sent`, retransmissions included).
    pub bytes_sent: u64,
    /// Bytes the server received (`bytes_received`).
    pub bytes_received: u64,
}

/// The totals of the established TCP connections whose local port is `port`
/// (the server's side), from `ss`.
pub fn socket_totals(port: u16) -> anyhow::Result<SocketTotals> {
    let output = std::process::Command::new("ss")
        .args([
            "-tinH",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .context("cannot run ss (iproute2)")?;
    anyhow::ensure!(
        output.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(parse_ss(&String::from_utf8_lossy(&output.stdout)))
}

/// Parses `ss -tinH` output: one line per connection, then an indented line
/// of `key:value` figures (a zero counter may be left out).
pub fn parse_ss(text: &str) -> SocketTotals {
    let mut totals = SocketTotals::default();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(char::is_whitespace) {
            totals.connections += 1;
            continue;
        }
        for token in line.split_whitespace() {
            let figure = |key: &str| token.strip_prefix(key).and_then(|v| v.parse::<u64>().ok());
            if let Some(value) = figure("bytes_sent:") {
                totals.bytes_sent += value;
            } else if let Some(value) = figure("bytes_received:") {
                totals.bytes_received += value;
            }
        }
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_connections() {
        let text = "0      0      127.0.0.1:8883 127.0.0.1:54702 \n\t bbr wscale:10,10 cwnd:11 bytes_sent:21 bytes_acked:22 bytes_received:6 segs_out:4\n0      0      127.0.0.1:8883  127.0.0.1:54703\n\t bbr cwnd:11 bytes_sent:100 bytes_acked:100 segs_out:2\n";
        assert_eq!(
            parse_ss(text),
            SocketTotals {
                connections: 2,
                bytes_sent: 121,
                bytes_received: 6,
            }
        );
        assert_eq!(parse_ss(""), SocketTotals::default());
    }

    #[test]
    fn reads_a_live_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        std::io::Write::write_all(&mut server, &[7u8; 1000]).unwrap();
        let mut received = [0u8; 1000];
        std::io::Read::read_exact(&mut client, &mut received).unwrap();
        let totals = socket_totals(port).unwrap();
        assert_eq!(totals.connections, 1);
        assert_eq!(totals.bytes_sent, 1000);
    }
}
