//! The DATA receiver under arbitrary input and read sizes, checked against a
//! simple model; its wire output (what the gateway relays) against the
//! stuffer applied to its plain output; the relay path (runs of lines
//! passed on from the input) against that wire output; and the stuff -> receive round trip
//! that keeps the gateway and the backend agreeing on where a message ends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayguard::smtp::data::{DataReceiver, DataStatus, DotStuffer};

struct Run {
    out: Vec<u8>,
    consumed: usize,
    complete: bool,
    violation: Option<relayguard::smtp::data::DataViolation>,
}

fn receive(max_line: usize, max_size: u64, input: &[u8], step: usize) -> Run {
    let mut rx = DataReceiver::new(max_line, max_size);
    let mut out = Vec::new();
    let mut consumed = 0;
    let mut complete = false;
    for chunk in input.chunks(step) {
        let (n, status) = rx.ingest(chunk, &mut out);
        assert!(n <= chunk.len());
        consumed += n;
        if status == DataStatus::Complete {
            complete = true;
            break;
        }
        assert_eq!(n, chunk.len());
    }
    assert!(out.len() as u64 <= max_size);
    assert!(rx.size() >= out.len() as u64);
    Run {
        out,
        consumed,
        complete,
        violation: rx.violation(),
    }
}

/// The end is `. CR LF` at the very start or the first `CR LF . CR LF`;
/// returns (length of the content, CRLF included, bytes consumed).
fn model_end(input: &[u8]) -> Option<(usize, usize)> {
    if input.starts_with(b".\r\n") {
        return Some((0, 3));
    }
    let i = input.windows(5).position(|w| w == b"\r\n.\r\n")?;
    Some((i + 2, i + 5))
}

/// Lines are separated by CRLF only; each loses one leading dot.
fn model_unstuff(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = content;
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n");
        let (line, next) = match line_end {
            Some(i) => (&rest[..i + 2], Some(&rest[i + 2..])),
            None => (rest, None),
        };
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        match next {
            Some(n) if !n.is_empty() => rest = n,
            _ => return out,
        }
    }
}

fn has_bad_byte(m: &[u8]) -> bool {
    m.iter().enumerate().any(|(i, &b)| {
        b == 0
            || (b == b'\r' && m.get(i + 1) != Some(&b'\n'))
            || (b == b'\n' && (i == 0 || m[i - 1] != b'\r'))
    })
}

fuzz_target!(|data: &[u8]| {
    let [a, b, input @ ..] = data else {
        return;
    };
    let step = 1 + usize::from(*a % 32);
    let small_limit = u64::from(*b);

    // 1. Raw client input, against the model.
    let run = receive(usize::MAX, u64::MAX, input, step);
    match model_end(input) {
        Some((content_len, consumed)) => {
            assert!(run.complete);
            assert_eq!(run.consumed, consumed);
            let want = model_unstuff(&input[..content_len]);
            assert_eq!(run.violation.is_some(), has_bad_byte(&want));
            assert_eq!(run.out, want);
        }
        None => {
            assert!(!run.complete);
            assert_eq!(run.consumed, input.len());
        }
    }
    // The wire form relayed to the backend: same end and verdict, and for a
    // message without violations exactly the stuffer's output of the plain
    // form (without the terminator, which the gateway adds itself).
    let mut rx = DataReceiver::new(usize::MAX, u64::MAX);
    let mut relayed = Vec::new();
    let mut consumed = 0;
    let mut complete = false;
    for chunk in input.chunks(step) {
        let (n, status) = rx.ingest_stuffed(chunk, &mut relayed);
        consumed += n;
        if status == DataStatus::Complete {
            complete = true;
            break;
        }
    }
    assert_eq!((consumed, complete), (run.consumed, run.complete));
    assert_eq!(rx.violation(), run.violation);

    // The relay path (runs of lines left in the read buffer, the rest
    // assembled around them) puts together exactly the same wire form, read
    // by read, with the same end, size and verdict.
    let mut stuffed = DataReceiver::new(usize::from(*b) + 1, u64::MAX);
    let mut relay = DataReceiver::new(usize::from(*b) + 1, u64::MAX).with_pass_min(1 + usize::from(*a / 32));
    for chunk in input.chunks(step) {
        let mut want = Vec::new();
        let (n, status) = stuffed.ingest_stuffed(chunk, &mut want);
        let mut out = Vec::new();
        let (m, relayed, passed) = relay.ingest_relay(chunk, &mut out);
        assert_eq!((m, relayed), (n, status));
        let got = match passed {
            Some(p) => {
                assert!(p.range.end <= m && p.at <= out.len());
                [&out[..p.at], &chunk[p.range], &out[p.at..]].concat()
            }
            None => out,
        };
        assert_eq!(got, want);
        assert_eq!(relay.size(), stuffed.size());
        assert_eq!(relay.violation(), stuffed.violation());
        if status == DataStatus::Complete {
            break;
        }
    }
    if complete && run.violation.is_none() {
        let mut want = Vec::new();
        let mut stuffer = DotStuffer::new();
        stuffer.push(&run.out, &mut want);
        stuffer.finish(&mut want);
        want.truncate(want.len() - 3);
        assert_eq!(relayed, want);
    }

    // Small limits: same end, output a prefix of the unlimited one.
    let limited = receive(usize::from(*b) + 1, small_limit, input, step);
    assert_eq!(
        (limited.consumed, limited.complete),
        (run.consumed, run.complete)
    );
    assert!(run.out.starts_with(&limited.out));

    // 2. Round trip: whatever the content, the stuffed message ends exactly
    //    where the stuffer put the terminator, never earlier.
    let mut stuffer = DotStuffer::new();
    let mut wire = Vec::new();
    for chunk in input.chunks(step) {
        stuffer.push(chunk, &mut wire);
    }
    stuffer.finish(&mut wire);
    let stuffed_len = wire.len();
    wire.extend_from_slice(b"QUIT\r\n");
    let back = receive(usize::MAX, u64::MAX, &wire, step);
    assert!(back.complete);
    assert_eq!(back.consumed, stuffed_len);
    if has_bad_byte(input) {
        assert!(back.violation.is_some());
    } else {
        let mut want = input.to_vec();
        if !want.is_empty() && !want.ends_with(b"\r\n") {
            want.extend_from_slice(b"\r\n");
        }
        assert_eq!(back.out, want);
        assert_eq!(back.violation, None);
    }
});
