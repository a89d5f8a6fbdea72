//! The PROXY protocol (HAProxy's, versions 1 and 2): the client address
//! behind a load balancer.
//!
//! Place in the flow: right after `accept`, before admission by address,
//! the early-talker check, TLS and the SMTP session. A listener with
//! `proxy_protocol: true` first checks that the TCP peer is one of the
//! [`TrustedProxies`] (anyone else could claim any address), then calls
//! [`read_header`]; the source address it returns replaces the TCP peer for
//! everything that follows — policy, per-address limits and lockouts, logs
//! and the `Received:` header.
//!
//! Reading is careful not to eat SMTP: the header's length is learned from
//! peeked bytes, and only bytes known to belong to the header are consumed
//! (v1: up to the first LF; v2: the 16-byte preamble plus the length it
//! declares). Whatever the client sends after the header stays in the
//! socket for the session. Parsing itself is sans-IO ([`header_len`],
//! [`parse`]) and done by the `ppp` crate; this module adds the framing,
//! the size caps, the rules of the specification that `ppp` leaves to the
//! receiver, and the timeout.
//!
//! Specification: <https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt>

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Longest version 1 header, CRLF included (specification, section 2.1).
pub const MAX_V1_LEN: usize = 107;

/// Longest version 2 header accepted, preamble and TLVs included. The
/// format allows 16 + 65535 octets, but real balancers send a few dozen
/// (addresses plus small TLVs: AWS VPC endpoint id, Azure link id, HAProxy
/// unique id, SSL facts); a cap keeps a hostile "proxy" from making every
/// connection allocate 64 KiB before anything else is checked.
pub const MAX_V2_LEN: usize = 4096;

/// The 12-octet signature that starts every version 2 header.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Length of the fixed part of a version 2 header.
const V2_PREAMBLE: usize = 16;

const V1_PREFIX: &[u8] = b"PROXY ";

/// Why no client address could be read. Every variant but [`ProxyError::Io`]
/// is the fault of whoever is on the other end of the TCP connection (a
/// misconfigured balancer, or not a balancer at all).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The connection did not start with a PROXY v1 or v2 signature: a
    /// plain SMTP client on a PROXY listener, or a balancer without
    /// `send-proxy`.
    #[error("no PROXY protocol header (the connection does not start with one)")]
    NotProxy,
    /// Longer than [`MAX_V1_LEN`] / [`MAX_V2_LEN`].
    #[error("PROXY v{version} header longer than {limit} octets")]
    TooLong { version: u8, limit: usize },
    /// Started like a PROXY header but is not a valid one.
    #[error("malformed PROXY v{version} header: {reason}")]
    Malformed { version: u8, reason: String },
    /// Valid, but for something SMTP cannot be: a datagram (UDP) stream.
    #[error("PROXY v2 header for an unsupported transport: {0}")]
    Unsupported(&'static str),
    /// The peer closed the connection before the header was complete.
    #[error("connection closed inside the PROXY header")]
    Closed,
    /// No complete header within the timeout.
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    /// The socket failed.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

impl ProxyError {
    /// A short stable label for logs and metrics (`reason="…"`).
    pub fn label(&self) -> &'static str {
        match self {
            ProxyError::NotProxy => "not_proxy",
            ProxyError::TooLong { .. } => "too_long",
            ProxyError::Malformed { .. } => "malformed",
            ProxyError::Unsupported(_) => "unsupported",
            ProxyError::Closed => "closed",
            ProxyError::Timeout(_) => "timeout",
            ProxyError::Io(_) => "io",
        }
    }
}

/// Which version of the protocol a header used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    pub version: Version,
    /// The original client. `None` when the header carries no usable
    /// address (v1 `UNKNOWN`, v2 `LOCAL` — a balancer's own health check —,
    /// v2 `UNSPEC` or `AF_UNIX`): the specification then says to use the
    /// connection's own endpoints.
    pub source: Option<SocketAddr>,
    /// The address the client connected to (on the balancer).
    pub destination: Option<SocketAddr>,
}

/// How long the header is, judged from its first octets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// The header is exactly this many octets (the whole of it may not
    /// have arrived yet).
    Complete(usize),
    /// Still undecided, but all of `buf` is header: it may be consumed.
    NeedMore,
}

/// How many octets of `buf` (the start of a connection) the header takes.
/// Pure: no I/O, no allocation.
pub fn header_len(buf: &[u8]) -> Result<Framing, ProxyError> {
    let Some(&first) = buf.first() else {
        return Ok(Framing::NeedMore);
    };
    match first {
        b'\r' => v2_len(buf),
        b'P' => v1_len(buf),
        _ => Err(ProxyError::NotProxy),
    }
}

fn v1_len(buf: &[u8]) -> Result<Framing, ProxyError> {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Err(ProxyError::NotProxy);
    }
    let window = &buf[..buf.len().min(MAX_V1_LEN)];
    match window.iter().position(|&b| b == b'\n') {
        Some(lf) => Ok(Framing::Complete(lf + 1)),
        None if buf.len() >= MAX_V1_LEN => Err(ProxyError::TooLong {
            version: 1,
            limit: MAX_V1_LEN,
        }),
        None => Ok(Framing::NeedMore),
    }
}

fn v2_len(buf: &[u8]) -> Result<Framing, ProxyError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(ProxyError::NotProxy);
    }
    if buf.len() < V2_PREAMBLE {
        return Ok(Framing::NeedMore);
    }
    if buf[12] >> 4 != 2 {
        return Err(ProxyError::Malformed {
            version: 2,
            reason: format!("version nibble {:#x}, expected 2", buf[12] >> 4),
        });
    }
    let total = V2_PREAMBLE + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if total > MAX_V2_LEN {
        return Err(ProxyError::TooLong {
            version: 2,
            limit: MAX_V2_LEN,
        });
    }
    Ok(Framing::Complete(total))
}

/// Parses one complete header, exactly `header_len` octets. Pure.
pub fn parse(header: &[u8]) -> Result<ProxyHeader, ProxyError> {
    match header_len(header)? {
        Framing::Complete(n) if n == header.len() => {}
        Framing::Complete(n) => {
            return Err(ProxyError::Malformed {
                version: if header.first() == Some(&b'P') { 1 } else { 2 },
                reason: format!("header is {n} octets, {} given", header.len()),
            })
        }
        Framing::NeedMore => return Err(ProxyError::Closed),
    }
    if header[0] == b'P' {
        parse_v1(header)
    } else {
        parse_v2(header)
    }
}

fn parse_v1(header: &[u8]) -> Result<ProxyHeader, ProxyError> {
    use ppp::v1::{Addresses, Header};
    let malformed = |reason: String| ProxyError::Malformed { version: 1, reason };
    let parsed = Header::try_from(header).map_err(|e| malformed(e.to_string()))?;
    // ppp stops at the first CR; we stopped at the first LF. They agree
    // only for a header that ends in CRLF and has no other CR.
    if parsed.header.len() != header.len() {
        return Err(malformed("stray CR or LF inside the header".into()));
    }
    let (source, destination) = match parsed.addresses {
        Addresses::Tcp4(a) => (
            Some(SocketAddr::new(a.source_address.into(), a.source_port)),
            Some(SocketAddr::new(
                a.destination_address.into(),
                a.destination_port,
            )),
        ),
        Addresses::Tcp6(a) => (
            Some(SocketAddr::new(a.source_address.into(), a.source_port)),
            Some(SocketAddr::new(
                a.destination_address.into(),
                a.destination_port,
            )),
        ),
        Addresses::Unknown => (None, None),
    };
    Ok(ProxyHeader {
        version: Version::V1,
        source: source.map(canonical),
        destination: destination.map(canonical),
    })
}

fn parse_v2(header: &[u8]) -> Result<ProxyHeader, ProxyError> {
    use ppp::v2::{AddressFamily, Addresses, Command, Header, Protocol};
    let malformed = |reason: String| ProxyError::Malformed { version: 2, reason };
    let parsed = Header::try_from(header).map_err(|e| malformed(e.to_string()))?;
    if parsed.header.len() != header.len() {
        return Err(malformed("length field disagrees with the header".into()));
    }
    let none = ProxyHeader {
        version: Version::V2,
        source: None,
        destination: None,
    };
    // LOCAL: the balancer speaking for itself (health checks). The
    // specification says to ignore the address block entirely.
    if parsed.command == Command::Local {
        return Ok(none);
    }
    // Only these family/protocol bytes exist; the specification says any
    // other must be rejected (ppp accepts e.g. 0x10).
    match (parsed.address_family(), parsed.protocol) {
        (AddressFamily::Unspecified, Protocol::Unspecified) => Ok(none),
        (AddressFamily::Unix, Protocol::Stream) => Ok(none),
        (AddressFamily::IPv4 | AddressFamily::IPv6 | AddressFamily::Unix, Protocol::Datagram) => {
            Err(ProxyError::Unsupported("UDP (SOCK_DGRAM)"))
        }
        (AddressFamily::IPv4 | AddressFamily::IPv6, Protocol::Stream) => {
            let (source, destination) = match parsed.addresses {
                Addresses::IPv4(a) => (
                    SocketAddr::new(a.source_address.into(), a.source_port),
                    SocketAddr::new(a.destination_address.into(), a.destination_port),
                ),
                Addresses::IPv6(a) => (
                    SocketAddr::new(a.source_address.into(), a.source_port),
                    SocketAddr::new(a.destination_address.into(), a.destination_port),
                ),
                Addresses::Unspecified | Addresses::Unix(_) => return Ok(none),
            };
            Ok(ProxyHeader {
                version: Version::V2,
                source: Some(canonical(source)),
                destination: Some(canonical(destination)),
            })
        }
        (family, protocol) => Err(malformed(format!(
            "invalid family/protocol {family:?}/{protocol:?}"
        ))),
    }
}

/// `::ffff:192.0.2.1` is 192.0.2.1: policies and limits are written for
/// the IPv4 form, and a dual-stack balancer may send either.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Reads the PROXY header at the start of `stream` and returns the original
/// client's address, or `None` when the header says to keep the
/// connection's own (v1 `UNKNOWN`, v2 `LOCAL`/`UNSPEC`). Consumes exactly
/// the header: the octets after it are left for the SMTP session.
///
/// Call it only for peers in [`TrustedProxies`]: the header is a claim, and
/// only a balancer we run may make it.
pub async fn read_header(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyError> {
    Ok(read_proxy_header(stream, timeout).await?.source)
}

/// Like [`read_header`], with everything the header said (version,
/// destination) for logs.
pub async fn read_proxy_header(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<ProxyHeader, ProxyError> {
    match tokio::time::timeout(timeout, read_exact_header(stream)).await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::Timeout(timeout)),
    }
}

/// Peek, decide how much is header, consume exactly that, repeat. Bytes
/// are consumed before the header is complete only when [`header_len`]
/// says they are all header, so the next peek waits for new data instead
/// of spinning on what is already there.
async fn read_exact_header(stream: &mut TcpStream) -> Result<ProxyHeader, ProxyError> {
    let mut header: Vec<u8> = Vec::with_capacity(MAX_V1_LEN);
    let mut peeked = [0u8; 256];
    loop {
        let n = stream.peek(&mut peeked).await?;
        if n == 0 {
            return Err(ProxyError::Closed);
        }
        let seen = header.len();
        header.extend_from_slice(&peeked[..n]);
        match header_len(&header)? {
            Framing::Complete(total) => {
                // The rest of the header: whatever of it was peeked plus,
                // for long v2 headers, octets not yet seen. All of them are
                // header by its declared length, so read_exact is safe.
                header.truncate(seen);
                header.resize(total, 0);
                stream.read_exact(&mut header[seen..]).await.map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        ProxyError::Closed
                    } else {
                        ProxyError::Io(e)
                    }
                })?;
                return parse(&header);
            }
            Framing::NeedMore => {
                // All n peeked octets are header: take them off the socket.
                stream.read_exact(&mut peeked[..n]).await?;
            }
        }
    }
}

/// The networks whose connections may carry a PROXY header: the balancers.
/// A header from anywhere else is refused, because it would let any client
/// choose the address that policy, limits and logs see.
///
/// In YAML: a list of CIDR networks or plain addresses,
/// `["10.0.0.0/8", "192.0.2.10", "2001:db8::/32"]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        TrustedProxies(nets)
    }

    /// Is `ip` inside one of the networks? IPv4-mapped IPv6 addresses (a
    /// dual-stack listener's view of an IPv4 peer) count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn networks(&self) -> &[IpNet] {
        &self.0
    }
}

impl From<Vec<IpNet>> for TrustedProxies {
    fn from(nets: Vec<IpNet>) -> Self {
        TrustedProxies(nets)
    }
}

/// One entry: `10.0.0.0/8` or `192.0.2.10` (a single host).
fn parse_network(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        // 10.0.0.7/8 is almost certainly a typo for 10.0.0.0/8 or /32.
        if net.network() != net.addr() {
            return Err(format!(
                "`{text}` has host bits set: did you mean `{}` or `{}/{}`?",
                net.trunc(),
                net.addr(),
                net.max_prefix_len()
            ));
        }
        return Ok(net);
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("`{text}` is not an IP address or CIDR network"))
}

impl std::str::FromStr for TrustedProxies {
    type Err = String;
    /// A comma-separated list, as on a command line.
    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(parse_network)
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }
}

impl<'de> Deserialize<'de> for TrustedProxies {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let items = Vec::<String>::deserialize(d)?;
        items
            .iter()
            .map(|s| parse_network(s))
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A v2 header: version/command byte, family/protocol byte, address
    /// block and TLVs.
    fn v2(ver_cmd: u8, fam_proto: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(ver_cmd);
        h.push(fam_proto);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn v4_block(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&src);
        b.extend_from_slice(&dst);
        b.extend_from_slice(&sport.to_be_bytes());
        b.extend_from_slice(&dport.to_be_bytes());
        b
    }

    fn v6_block(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&src.octets());
        b.extend_from_slice(&dst.octets());
        b.extend_from_slice(&sport.to_be_bytes());
        b.extend_from_slice(&dport.to_be_bytes());
        b
    }

    fn ok(source: Option<&str>, destination: Option<&str>, version: Version) -> ProxyHeader {
        ProxyHeader {
            version,
            source: source.map(sa),
            destination: destination.map(sa),
        }
    }

    #[test]
    fn v1_headers() {
        let cases: &[(&[u8], ProxyHeader)] = &[
            (
                b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n",
                ok(Some("192.0.2.7:40000"), Some("198.51.100.1:25"), Version::V1),
            ),
            (
                b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 587\r\n",
                ok(
                    Some("[2001:db8::7]:40000"),
                    Some("[2001:db8::1]:587"),
                    Version::V1,
                ),
            ),
            (
                // An IPv4 client seen by a dual-stack balancer.
                b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:198.51.100.1 1 2\r\n",
                ok(Some("192.0.2.7:1"), Some("198.51.100.1:2"), Version::V1),
            ),
            (b"PROXY UNKNOWN\r\n", ok(None, None, Version::V1)),
            (
                b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
                ok(None, None, Version::V1),
            ),
            (
                b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
                ok(
                    Some("255.255.255.255:65535"),
                    Some("255.255.255.255:65535"),
                    Version::V1,
                ),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                header_len(input).unwrap(),
                Framing::Complete(input.len()),
                "{:?}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(
                &parse(input).unwrap(),
                expected,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn v1_malformed() {
        // (input, expected error label, what is wrong)
        let cases: &[(&[u8], &str, &str)] = &[
            (
                b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\n",
                "malformed",
                "no CR",
            ),
            (
                b"PROXY TCP4 192.0.2.7 198.51.100.1 40000\r\n",
                "malformed",
                "no port",
            ),
            (
                b"PROXY TCP4 2001:db8::7 198.51.100.1 1 2\r\n",
                "malformed",
                "v6 in TCP4",
            ),
            (
                b"PROXY TCP6 192.0.2.7 2001:db8::1 1 2\r\n",
                "malformed",
                "v4 in TCP6",
            ),
            (
                b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n",
                "malformed",
                "port",
            ),
            (
                b"PROXY TCP4 192.0.2.7 198.51.100.1 025 25\r\n",
                "malformed",
                "leading 0",
            ),
            (
                b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2 3\r\n",
                "malformed",
                "extra field",
            ),
            (
                b"PROXY TCP4  192.0.2.7 198.51.100.1 1 2\r\n",
                "malformed",
                "two spaces",
            ),
            (
                b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
                "malformed",
                "UDP",
            ),
            (
                b"PROXY TCP4 192.0.2.7\r198.51.100.1 1 2\r\n",
                "malformed",
                "stray CR",
            ),
            (b"PROXY \xff\xfe\r\n", "malformed", "not UTF-8"),
            (b"PROXY\r\n", "not_proxy", "no space after PROXY"),
            (
                b"PROXYTCP4 1.2.3.4 1.2.3.4 1 2\r\n",
                "not_proxy",
                "no space",
            ),
            (b"EHLO client.test\r\n", "not_proxy", "SMTP"),
            (
                b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
                "not_proxy",
                "lower case",
            ),
            (b"\x16\x03\x01\x00\xa5", "not_proxy", "a TLS ClientHello"),
        ];
        for (input, label, why) in cases {
            let got = parse(input);
            assert_eq!(
                got.as_ref().map_err(ProxyError::label),
                Err(*label),
                "{why}: {:?} gave {got:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn v1_length_cap() {
        // 107 octets without LF: cannot become a valid header any more.
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 93]].concat();
        assert_eq!(long.len(), MAX_V1_LEN);
        assert!(matches!(
            header_len(&long),
            Err(ProxyError::TooLong { version: 1, .. })
        ));
        // One octet fewer is still undecided.
        assert_eq!(header_len(&long[..106]).unwrap(), Framing::NeedMore);
        // The longest legal header (UNKNOWN with two full IPv6 addresses,
        // 104 octets + CRLF) fits.
        let longest = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert!(longest.len() <= MAX_V1_LEN);
        assert!(parse(longest).is_ok());
    }

    #[test]
    fn v1_framing_of_prefixes() {
        let full = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\nEHLO x\r\n";
        let end = full.iter().position(|&b| b == b'\n').unwrap() + 1;
        for cut in 0..end {
            assert_eq!(
                header_len(&full[..cut]).unwrap(),
                Framing::NeedMore,
                "cut {cut}"
            );
        }
        for cut in end..=full.len() {
            assert_eq!(
                header_len(&full[..cut]).unwrap(),
                Framing::Complete(end),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn v2_headers() {
        let src6: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let dst6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let mapped: Ipv6Addr = Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped();
        let mut with_tlvs = v4_block([192, 0, 2, 7], [198, 51, 100, 1], 40000, 25);
        // PP2_TYPE_ALPN "smtp", PP2_TYPE_AUTHORITY, a NOOP: all ignored.
        with_tlvs.extend_from_slice(&[0x01, 0x00, 0x04]);
        with_tlvs.extend_from_slice(b"smtp");
        with_tlvs.extend_from_slice(&[0x02, 0x00, 0x03]);
        with_tlvs.extend_from_slice(b"mx1");
        with_tlvs.extend_from_slice(&[0x04, 0x00, 0x00]);
        let unix_block = vec![0u8; 216];
        let cases: Vec<(Vec<u8>, ProxyHeader)> = vec![
            (
                v2(
                    0x21,
                    0x11,
                    &v4_block([192, 0, 2, 7], [198, 51, 100, 1], 40000, 25),
                ),
                ok(
                    Some("192.0.2.7:40000"),
                    Some("198.51.100.1:25"),
                    Version::V2,
                ),
            ),
            (
                v2(0x21, 0x21, &v6_block(src6, dst6, 40000, 465)),
                ok(
                    Some("[2001:db8::7]:40000"),
                    Some("[2001:db8::1]:465"),
                    Version::V2,
                ),
            ),
            (
                v2(0x21, 0x21, &v6_block(mapped, dst6, 1, 2)),
                ok(Some("192.0.2.7:1"), Some("[2001:db8::1]:2"), Version::V2),
            ),
            (
                v2(0x21, 0x11, &with_tlvs),
                ok(
                    Some("192.0.2.7:40000"),
                    Some("198.51.100.1:25"),
                    Version::V2,
                ),
            ),
            // LOCAL (a health check): addresses ignored, whatever they say.
            (v2(0x20, 0x00, &[]), ok(None, None, Version::V2)),
            (
                v2(
                    0x20,
                    0x11,
                    &v4_block([192, 0, 2, 7], [198, 51, 100, 1], 1, 2),
                ),
                ok(None, None, Version::V2),
            ),
            (v2(0x20, 0x12, &[0; 12]), ok(None, None, Version::V2)),
            // PROXY with UNSPEC: keep the connection's addresses.
            (v2(0x21, 0x00, &[]), ok(None, None, Version::V2)),
            (v2(0x21, 0x00, &[0xAA; 8]), ok(None, None, Version::V2)),
            (v2(0x21, 0x31, &unix_block), ok(None, None, Version::V2)),
        ];
        for (input, expected) in cases {
            assert_eq!(header_len(&input).unwrap(), Framing::Complete(input.len()));
            assert_eq!(parse(&input).unwrap(), expected, "{input:02x?}");
        }
    }

    #[test]
    fn v2_malformed() {
        let block = v4_block([192, 0, 2, 7], [198, 51, 100, 1], 1, 2);
        let mut bad_sig = v2(0x21, 0x11, &block);
        bad_sig[8] = b'X';
        // (input, expected error label, what is wrong)
        let cases: Vec<(Vec<u8>, &str, &str)> = vec![
            (v2(0x11, 0x11, &block), "malformed", "version 1 nibble"),
            (v2(0x31, 0x11, &block), "malformed", "version 3"),
            (v2(0x22, 0x11, &block), "malformed", "command 2"),
            (v2(0x21, 0x41, &block), "malformed", "family 4"),
            (v2(0x21, 0x13, &block), "malformed", "protocol 3"),
            (
                v2(0x21, 0x10, &block),
                "malformed",
                "AF_INET, UNSPEC protocol",
            ),
            (v2(0x21, 0x01, &[]), "malformed", "UNSPEC family, STREAM"),
            (
                v2(0x21, 0x11, &block[..11]),
                "malformed",
                "short address block",
            ),
            (
                v2(0x21, 0x21, &block),
                "malformed",
                "IPv4 block for AF_INET6",
            ),
            (v2(0x21, 0x12, &block), "unsupported", "UDP over IPv4"),
            (v2(0x21, 0x22, &[0; 36]), "unsupported", "UDP over IPv6"),
            (bad_sig, "not_proxy", "signature"),
        ];
        for (input, label, why) in cases {
            let got = parse(&input);
            assert_eq!(
                got.as_ref().map_err(ProxyError::label),
                Err(label),
                "{why}: {input:02x?} gave {got:?}"
            );
        }
    }

    #[test]
    fn v2_length_cap_and_framing() {
        let block = v4_block([192, 0, 2, 7], [198, 51, 100, 1], 1, 2);
        let full = v2(0x21, 0x11, &block);
        for cut in 0..V2_PREAMBLE {
            assert_eq!(header_len(&full[..cut]).unwrap(), Framing::NeedMore);
        }
        for cut in V2_PREAMBLE..=full.len() {
            assert_eq!(
                header_len(&full[..cut]).unwrap(),
                Framing::Complete(full.len())
            );
        }
        // The declared length alone decides, before the body arrives.
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(
            header_len(&huge),
            Err(ProxyError::TooLong { version: 2, .. })
        ));
        let max_body = vec![0u8; MAX_V2_LEN - V2_PREAMBLE];
        let mut at_cap = v2(0x21, 0x11, &block);
        at_cap.truncate(V2_PREAMBLE);
        at_cap[14..16].copy_from_slice(&(max_body.len() as u16).to_be_bytes());
        assert_eq!(header_len(&at_cap).unwrap(), Framing::Complete(MAX_V2_LEN));
    }

    #[test]
    fn parse_wants_exactly_the_header() {
        let h = b"PROXY UNKNOWN\r\nEHLO";
        assert_eq!(parse(h).map_err(|e| e.label()), Err("malformed"));
        assert_eq!(parse(b"PROXY UNK").map_err(|e| e.label()), Err("closed"));
        assert_eq!(parse(b"").map_err(|e| e.label()), Err("closed"));
    }

    #[test]
    fn trusted_proxies() {
        let t: TrustedProxies = "10.0.0.0/8, 192.0.2.10, 2001:db8::/32".parse().unwrap();
        assert!(t.contains("10.1.2.3".parse().unwrap()));
        assert!(t.contains("192.0.2.10".parse().unwrap()));
        assert!(!t.contains("192.0.2.11".parse().unwrap()));
        assert!(t.contains("2001:db8::5".parse().unwrap()));
        assert!(!t.contains("2001:db9::5".parse().unwrap()));
        // A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6.
        assert!(t.contains("::ffff:10.9.9.9".parse().unwrap()));
        assert!(!t.contains("::ffff:11.0.0.1".parse().unwrap()));
        assert!(!TrustedProxies::default().contains("127.0.0.1".parse().unwrap()));

        let e = "10.0.0.7/8".parse::<TrustedProxies>().unwrap_err();
        assert!(e.contains("host bits"), "{e}");
        let e = "10.0.0.0/33".parse::<TrustedProxies>().unwrap_err();
        assert!(e.contains("not an IP address"), "{e}");
    }

    #[test]
    fn trusted_proxies_from_yaml() {
        #[derive(Deserialize)]
        struct L {
            trusted_proxies: TrustedProxies,
        }
        let l: L = serde_norway::from_str("trusted_proxies: [\"127.0.0.1/32\", \"::1\"]").unwrap();
        assert_eq!(l.trusted_proxies.networks().len(), 2);
        assert!(l.trusted_proxies.contains("::1".parse().unwrap()));
        let e = serde_norway::from_str::<L>("trusted_proxies: [\"localhost\"]")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`localhost` is not an IP address"), "{e}");
    }

    /// A connected loopback pair: (what the test writes to, the server side).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    const LONG: Duration = Duration::from_secs(30);

    /// Whatever follows the header is still in the socket, byte for byte.
    async fn rest(server: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        server.read_exact(&mut buf).await.unwrap();
        buf
    }

    #[tokio::test]
    async fn reads_v1_and_leaves_smtp_bytes() {
        let (mut client, mut server) = pair().await;
        client
            .write_all(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\nEHLO client.test\r\n")
            .await
            .unwrap();
        let peer = read_header(&mut server, LONG).await.unwrap();
        assert_eq!(peer, Some(sa("192.0.2.7:40000")));
        assert_eq!(rest(&mut server, 18).await, b"EHLO client.test\r\n");
    }

    #[tokio::test]
    async fn reads_v2_with_tlvs_and_leaves_smtp_bytes() {
        let (mut client, mut server) = pair().await;
        let mut body = v6_block(
            "2001:db8::7".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
            1234,
            25,
        );
        body.extend_from_slice(&[0x04, 0x01, 0x00]);
        body.extend_from_slice(&[0u8; 256]); // a 256-octet NOOP TLV
        let mut bytes = v2(0x21, 0x21, &body);
        bytes.extend_from_slice(b"QUIT\r\n");
        client.write_all(&bytes).await.unwrap();
        let h = read_proxy_header(&mut server, LONG).await.unwrap();
        assert_eq!(h.source, Some(sa("[2001:db8::7]:1234")));
        assert_eq!(h.version, Version::V2);
        assert_eq!(rest(&mut server, 6).await, b"QUIT\r\n");
    }

    #[tokio::test]
    async fn header_in_pieces() {
        for header in [
            b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n".to_vec(),
            v2(
                0x21,
                0x11,
                &v4_block([192, 0, 2, 7], [1, 2, 3, 4], 40000, 25),
            ),
        ] {
            let (mut client, mut server) = pair().await;
            let reader = tokio::spawn(async move {
                let peer = read_header(&mut server, LONG).await;
                (peer, rest(&mut server, 4).await)
            });
            // One octet at a time, with the reader parked in between.
            for b in &header {
                client.write_all(&[*b]).await.unwrap();
                client.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            client.write_all(b"NOOP").await.unwrap();
            let (peer, after) = reader.await.unwrap();
            assert_eq!(peer.unwrap(), Some(sa("192.0.2.7:40000")));
            assert_eq!(after, b"NOOP");
        }
    }

    #[tokio::test]
    async fn local_and_unknown_keep_the_connection_address() {
        for header in [b"PROXY UNKNOWN\r\n".to_vec(), v2(0x20, 0x00, &[])] {
            let (mut client, mut server) = pair().await;
            client.write_all(&header).await.unwrap();
            assert_eq!(read_header(&mut server, LONG).await.unwrap(), None);
        }
    }

    #[tokio::test]
    async fn refusals() {
        // A plain SMTP client that talks first, a TLS client, garbage.
        for (bytes, label) in [
            (b"EHLO client.test\r\n".as_slice(), "not_proxy"),
            (b"\x16\x03\x01\x02\x00\x01", "not_proxy"),
            (b"PROXY TCP4 300.0.0.1 1.2.3.4 1 2\r\n", "malformed"),
        ] {
            let (mut client, mut server) = pair().await;
            client.write_all(bytes).await.unwrap();
            let e = read_header(&mut server, LONG).await.unwrap_err();
            assert_eq!(e.label(), label, "{e}");
        }
        // Closed halfway.
        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY TCP4 192.0.2.7").await.unwrap();
        drop(client);
        let e = read_header(&mut server, LONG).await.unwrap_err();
        assert_eq!(e.label(), "closed", "{e}");
        // v2 declaring more than it sends, then closing.
        let (mut client, mut server) = pair().await;
        let mut h = v2(0x21, 0x11, &[0; 12]);
        h.truncate(20);
        client.write_all(&h).await.unwrap();
        drop(client);
        let e = read_header(&mut server, LONG).await.unwrap_err();
        assert_eq!(e.label(), "closed", "{e}");
    }

    #[tokio::test]
    async fn timeout_without_a_complete_header() {
        // A zero timeout expires at the first wait, so these need no clock:
        // a silent client (an SMTP client waiting for the greeting) and a
        // partial header both time out.
        let (_client, mut server) = pair().await;
        let e = read_header(&mut server, Duration::ZERO).await.unwrap_err();
        assert_eq!(e.label(), "timeout", "{e}");

        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY TCP4 ").await.unwrap();
        let e = read_header(&mut server, Duration::ZERO).await.unwrap_err();
        assert_eq!(e.label(), "timeout", "{e}");
    }
}
