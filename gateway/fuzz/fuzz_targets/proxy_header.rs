//! PROXY protocol headers (v1 text, v2 binary) under arbitrary input: no
//! panic; the framing never claims more than the caps or than a complete
//! header needs; feeding the input in pieces decides exactly as feeding it
//! whole (which is what the socket reader relies on when it consumes peeked
//! octets before the header is complete); and a header that parses yields
//! addresses only for the forms that carry them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayguard::proxy_protocol::{
    header_len, parse, Framing, ProxyError, Version, MAX_V1_LEN, MAX_V2_LEN,
};

fuzz_target!(|data: &[u8]| {
    let whole = header_len(data);
    match &whole {
        Ok(Framing::Complete(n)) => {
            assert!(*n <= MAX_V2_LEN);
            if data[0] == b'P' {
                assert!(*n <= MAX_V1_LEN);
                assert_eq!(data[*n - 1], b'\n');
                assert!(!data[..*n - 1].contains(&b'\n'));
            } else {
                assert!(*n >= 16);
            }
            // Every shorter prefix is undecided (so its octets may be
            // consumed) until the point where the length is known.
            for cut in 0..(*n).min(data.len()) {
                match header_len(&data[..cut]) {
                    Ok(Framing::NeedMore) => {}
                    Ok(Framing::Complete(m)) => assert_eq!(m, *n, "cut {cut}"),
                    Err(e) => panic!("prefix {cut} of a framed header refused: {e}"),
                }
            }
            if *n <= data.len() {
                match parse(&data[..*n]) {
                    Ok(h) => {
                        assert_eq!(h.source.is_some(), h.destination.is_some());
                        if let Some(s) = h.source {
                            // Canonical: never IPv4-mapped IPv6.
                            assert_eq!(s.ip(), s.ip().to_canonical());
                        }
                        match h.version {
                            Version::V1 => assert_eq!(data[0], b'P'),
                            Version::V2 => assert_eq!(data[0], b'\r'),
                        }
                    }
                    Err(ProxyError::Timeout(_) | ProxyError::Io(_) | ProxyError::Closed) => {
                        panic!("parse of a complete header reported an I/O error")
                    }
                    Err(_) => {}
                }
            }
        }
        Ok(Framing::NeedMore) => {
            assert!(data.len() < MAX_V1_LEN.max(16));
            // Every prefix is undecided too.
            for cut in 0..data.len() {
                assert_eq!(header_len(&data[..cut]).ok(), Some(Framing::NeedMore));
            }
        }
        Err(_) => {
            // Once refused, more input never makes it acceptable.
            let mut longer = data.to_vec();
            longer.extend_from_slice(b"\r\n");
            assert!(header_len(&longer).is_err());
        }
    }
    // Label every error: the mapping to metrics is total.
    if let Err(e) = parse(data) {
        assert!(!e.label().is_empty());
    }
});
