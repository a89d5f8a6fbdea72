//! Backend replies under arbitrary input and read sizes: no panic, the same
//! replies however the input is split, and what we would pass on to a client
//! is well formed.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use relayguard::smtp::reply::{Capabilities, Reply, ReplyError, ReplyParser};

fn parse_all(enhanced: bool, input: &[u8], step: usize) -> (Vec<Reply>, Option<ReplyError>) {
    let mut parser = ReplyParser::new(enhanced);
    let mut buf = BytesMut::new();
    let mut replies = Vec::new();
    for chunk in input.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match parser.parse(&mut buf) {
                Ok(Some(r)) => replies.push(r),
                Ok(None) => break,
                Err(e) => return (replies, Some(e)),
            }
        }
    }
    (replies, None)
}

fuzz_target!(|data: &[u8]| {
    let [flags, input @ ..] = data else {
        return;
    };
    let enhanced = flags & 1 == 1;
    let step = 1 + usize::from(flags >> 1);
    let whole = parse_all(enhanced, input, input.len().max(1));
    let split = parse_all(enhanced, input, step);
    assert_eq!(whole, split);

    for reply in &whole.0 {
        assert!((200..=599).contains(&reply.code));
        assert!(!reply.lines.is_empty() && reply.lines.len() <= 200);
        if let Some(e) = reply.enhanced {
            assert_eq!(u16::from(e.0), reply.code / 100);
        }
        let _ = Capabilities::from_ehlo(reply);

        // Relayed to a client, it stays exactly as many lines, each at most
        // 512 octets with CRLF and with no stray CR or LF.
        let out = reply.to_bytes();
        let lines: Vec<&[u8]> = out.split_inclusive(|&b| b == b'\n').collect();
        assert_eq!(lines.len(), reply.lines.len());
        for line in &lines {
            assert!(line.len() <= 512);
            assert!(line.ends_with(b"\r\n"));
            assert!(!line[..line.len() - 2]
                .iter()
                .any(|&b| b == b'\r' || b == b'\n'));
            assert!(line.is_ascii());
        }
        // And it reads back as the same reply code and shape.
        let mut buf = BytesMut::from(&out[..]);
        let again = ReplyParser::new(reply.enhanced.is_some())
            .parse(&mut buf)
            .expect("own output parses")
            .expect("own output is complete");
        assert_eq!(again.code, reply.code);
        assert_eq!(again.lines.len(), reply.lines.len());
        assert!(buf.is_empty());
    }
});
