//! Command framing under arbitrary input and arbitrary read sizes, checked
//! against a one-line model of the intended behaviour.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use relayguard::smtp::line::{LineError, LineReader};

/// Every LF-terminated segment of the whole input gives one item; an
/// unterminated tail gives nothing.
fn model(max: usize, input: &[u8]) -> Vec<Result<Vec<u8>, LineError>> {
    let mut out = Vec::new();
    let mut rest = input;
    while let Some(i) = rest.iter().position(|&b| b == b'\n') {
        let seg = &rest[..=i];
        rest = &rest[i + 1..];
        out.push(if seg.len() > max {
            Err(LineError::TooLong)
        } else if !seg.ends_with(b"\r\n") {
            Err(LineError::BareLf)
        } else if seg.contains(&0) {
            Err(LineError::Nul)
        } else {
            Ok(seg[..seg.len() - 2].to_vec())
        });
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [len_sel, step, input @ ..] = data else {
        return;
    };
    let max = 2 + usize::from(*len_sel % 64);
    let step = 1 + usize::from(*step % 16);
    let mut reader = LineReader::new(max);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for chunk in input.chunks(step) {
        buf.extend_from_slice(chunk);
        while let Some(item) = reader.next_line(&mut buf) {
            if let Ok(line) = &item {
                assert!(line.len() + 2 <= max);
            }
            got.push(item.map(|b| b.to_vec()));
        }
        // Memory stays bounded by the line limit.
        assert!(buf.len() < max, "kept {} of max {max}", buf.len());
    }
    assert_eq!(got, model(max, input));
});
