//! The message body: receiving it from the client after `354`, and sending it
//! on to the backend.
//!
//! This is where SMTP smuggling happens (CVE-2023-51766 and relatives): if the
//! gateway and the backend disagree on where the message ends, a client can
//! hide a second SMTP transaction inside the body. So both directions are
//! strict and mirror each other:
//!
//! * [`DataReceiver`] ends the message only at `CR LF . CR LF`. Every other
//!   variant (`LF . LF`, `CR LF . LF`, `LF . CR LF`, `CR . CR`) stays content
//!   and is recorded as a violation, so the session can refuse the message.
//! * What goes to the backend is [`DataReceiver::ingest_stuffed`]'s output of
//!   a message without violations, only CRLF lines, so no lenient backend can
//!   find an end in it that the receiver did not; a message with a violation
//!   is never finished (its backend transaction is dropped without the dot).
//! * [`DotStuffer`], the reference the relayed output is tested and fuzzed
//!   against, treats *any* CR or LF as a line start, so a lone `.` after a
//!   bare line end would reach a backend doubled.

use std::fmt;
use std::ops::Range;

/// The first rule a message broke. The session refuses such a message rather
/// than repair it; repairing would mean guessing what the client meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataViolation {
    /// Larger than the size limit (unstuffed octets).
    TooLarge,
    /// A line longer than the limit, CRLF included (RFC 5321 §4.5.3.1.6).
    LineTooLong,
    /// LF not preceded by CR.
    BareLf,
    /// CR not followed by LF.
    BareCr,
    /// A NUL octet, which many backends truncate at.
    Nul,
}

impl fmt::Display for DataViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataViolation::TooLarge => "message too large",
            DataViolation::LineTooLong => "line too long",
            DataViolation::BareLf => "bare LF",
            DataViolation::BareCr => "bare CR",
            DataViolation::Nul => "NUL byte",
        })
    }
}

/// Whether the end of the message has been seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataStatus {
    NeedMore,
    Complete,
}

/// Where the receiver is relative to the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line: the start of the data or just after CRLF.
    LineStart,
    /// A `.` at the start of a line, not yet emitted (it is either stuffing
    /// or the start of the terminator).
    Dot,
    /// `.` CR at the start of a line.
    DotCr,
    /// Inside a line.
    Text,
    /// After a CR inside a line (already emitted); an LF must follow.
    Cr,
    /// The terminator has been consumed.
    Done,
}

/// A run of whole lines from the client's input that goes to the backend as
/// it is, instead of being copied into the output first (see
/// [`DataReceiver::ingest_relay`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passed {
    /// Where the run goes in the output: after `out[..at]`, before
    /// `out[at..]`.
    pub at: usize,
    /// The run, as a range of the input.
    pub range: Range<usize>,
}

/// Runs of clean lines shorter than this are copied: a small message stays
/// one contiguous buffer, and the copy costs less than another piece to
/// write.
const PASS_MIN: usize = 4096;

/// Receives the message after `354`, undoing dot-stuffing.
#[derive(Debug, Clone)]
pub struct DataReceiver {
    max_line: usize,
    max_size: u64,
    state: State,
    /// Unstuffed octets of the current line so far, CRLF included.
    line_len: usize,
    size: u64,
    violation: Option<DataViolation>,
    too_large: bool,
    /// The shortest run [`ingest_relay`](Self::ingest_relay) passes on.
    pass_min: usize,
}

impl DataReceiver {
    /// `max_line` is the longest text line including CRLF (RFC 5321: 1000);
    /// `max_size` the largest message in octets after unstuffing.
    pub fn new(max_line: usize, max_size: u64) -> Self {
        DataReceiver {
            max_line,
            max_size,
            state: State::LineStart,
            line_len: 0,
            size: 0,
            violation: None,
            too_large: false,
            pass_min: PASS_MIN,
        }
    }

    /// Sets the shortest run of lines [`ingest_relay`](Self::ingest_relay)
    /// leaves in the input (default [`PASS_MIN`]): the fuzzer sets it low so
    /// that small inputs take that path too.
    pub fn with_pass_min(mut self, bytes: usize) -> Self {
        self.pass_min = bytes.max(1);
        self
    }

    /// Consumes client bytes and appends the unstuffed message to `out`, with
    /// CRLF line ends and without the terminating `.` CRLF (the CRLF before
    /// the dot is part of the message, so a message always ends in CRLF).
    ///
    /// Returns how many bytes of `input` were used and whether the end was
    /// seen. Bytes after the terminator are left alone: with PIPELINING they
    /// are the client's next command. Once complete, further calls consume
    /// nothing.
    ///
    /// Only `CR LF . CR LF` (or `. CR LF` as the very first line: an empty
    /// message) ends the data. Violations do not stop reading, since the
    /// client would otherwise see its message body interpreted as commands;
    /// the first one is kept. After the size limit is passed nothing more is
    /// appended, so memory stays bounded.
    pub fn ingest(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, DataStatus) {
        self.scan::<false>(input, out, None)
    }

    /// Like [`ingest`](Self::ingest), but appends the message as it goes on
    /// the wire to the backend: dot-stuffed again, still without the
    /// terminator. For a message without violations this is the client's
    /// own bytes (a compliant client stuffed them already), so the gateway
    /// relays the body in one pass and one copy instead of unstuffing and
    /// stuffing it again. The fuzzer checks it against
    /// [`DotStuffer`] applied to [`ingest`](Self::ingest)'s output.
    ///
    /// Output produced in a call that found a violation must not be sent:
    /// unlike [`DotStuffer`], this does not treat bare CR or LF as line
    /// starts, because a message with one is refused, never forwarded.
    pub fn ingest_stuffed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, DataStatus) {
        self.scan::<true>(input, out, None)
    }

    /// Like [`ingest_stuffed`](Self::ingest_stuffed), but the first long run
    /// of clean lines (the bulk of a large body) is not copied: the wire
    /// form is `out[..at]`, then `input[range]`, then `out[at..]`. A large
    /// body then goes from the read buffer to the backend with no copy in
    /// between, as a byte pipe would relay it. The run is exactly what
    /// [`ingest_stuffed`](Self::ingest_stuffed) would have appended there;
    /// the same rule holds: output of a call that found a violation must
    /// not be sent.
    pub fn ingest_relay(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> (usize, DataStatus, Option<Passed>) {
        let mut passed = None;
        let (consumed, status) = self.scan::<true>(input, out, Some(&mut passed));
        (consumed, status, passed)
    }

    /// `pass`: where to record a run of lines left in the input instead of
    /// copied (only the first, and only one of at least `pass_min` bytes).
    fn scan<const STUFFED: bool>(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        mut pass: Option<&mut Option<Passed>>,
    ) -> (usize, DataStatus) {
        let mut i = 0;
        // Where whole-line runs may be tried again after one failed (see
        // `lines`): each byte is looked at in bulk at most once.
        let mut bulk_from = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Done => return (i, DataStatus::Complete),
                State::LineStart if b != b'.' && i >= bulk_from => {
                    let (taken, examined) = self.lines(&input[i..]);
                    if taken == 0 {
                        bulk_from = i + examined.max(1);
                        i += self.text(&input[i..], out);
                    } else {
                        let range = i..i + taken;
                        match pass.as_deref_mut() {
                            Some(slot @ None) if taken >= self.pass_min => {
                                *slot = Some(Passed {
                                    at: out.len(),
                                    range,
                                });
                            }
                            _ => out.extend_from_slice(&input[range]),
                        }
                        i += taken;
                    }
                }
                State::LineStart if b == b'.' => {
                    self.state = State::Dot;
                    i += 1;
                }
                State::Dot if b == b'\r' => {
                    self.state = State::DotCr;
                    i += 1;
                }
                State::DotCr if b == b'\n' => {
                    self.state = State::Done;
                    return (i + 1, DataStatus::Complete);
                }
                State::DotCr => {
                    // "." CR x: the dot was stuffing and the CR is bare; x is
                    // read again in state Cr.
                    self.emit(b"\r", out);
                    self.state = State::Cr;
                }
                State::Cr if b == b'\n' => {
                    self.emit(b"\n", out);
                    self.line_len = 0;
                    self.state = State::LineStart;
                    i += 1;
                }
                State::Cr => {
                    // b is read again as text.
                    self.violate(DataViolation::BareCr);
                    self.state = State::Text;
                }
                // A dot at a line start followed by anything but CR is
                // dropped (RFC 5321 §4.5.2) and what follows is text. On the
                // wire, a line whose content starts with a dot has it doubled.
                State::Dot if STUFFED && b == b'.' => {
                    self.stuff(out);
                    i += self.text(&input[i..], out);
                }
                State::LineStart | State::Dot | State::Text => {
                    i += self.text(&input[i..], out);
                }
            }
        }
        let status = if self.state == State::Done {
            DataStatus::Complete
        } else {
            DataStatus::NeedMore
        };
        (i, status)
    }

    /// From a line start, the longest run of whole lines that need no
    /// attention, counted (the caller copies or passes them on): each ends
    /// in CR LF, none holds another CR, a LF or a NUL, none is too long,
    /// none starts with a dot (stuffing or the end: the state machine takes
    /// those), and all fit the size limit. Such lines are the same unstuffed and on the wire.
    /// Returns (bytes taken, bytes examined); when nothing is taken the
    /// caller goes on byte by byte and does not look at the examined bytes
    /// in bulk again, so hostile input cannot make this quadratic.
    ///
    /// Two passes instead of one search per line (a 100 KB body has some
    /// 1,300 lines): [`first_bad_pair`] checks every byte against the one
    /// before it, in blocks the compiler vectorises, and line lengths are
    /// checked a window of `max_line` bytes at a time (its last LF).
    fn lines(&mut self, input: &[u8]) -> (usize, usize) {
        let room = usize::try_from(self.max_size.saturating_sub(self.size)).unwrap_or(usize::MAX);
        let region = &input[..input.len().min(room)];
        let Some(&first) = region.first() else {
            return (0, input.len());
        };
        // Where the first line that needs attention begins to: at 0 if the
        // first byte already does (a dot, a LF, a NUL).
        let bad = if matches!(first, b'.' | b'\n' | 0) {
            Some(0)
        } else {
            first_bad_pair(region)
        };
        let clean_to = bad.unwrap_or(region.len());
        let mut good = memchr::memrchr(b'\n', &region[..clean_to]).map_or(0, |lf| lf + 1);
        // No line longer than max_line: each window of max_line bytes from
        // a line start holds a LF; whole lines before the window's last LF
        // are shorter still.
        let mut start = 0;
        while start < good {
            let window = &region[start..good.min(start + self.max_line)];
            match memchr::memrchr(b'\n', window) {
                Some(lf) => start += lf + 1,
                None => good = start,
            }
        }
        if good == 0 {
            let examined = match bad {
                Some(at) if at < region.len() => at + 1,
                _ => memchr::memchr(b'\n', region).map_or(input.len(), |lf| lf + 1),
            };
            return (0, examined);
        }
        self.size += good as u64;
        (good, good)
    }

    /// Writes a stuffing dot (not part of the message, so not counted),
    /// unless the size limit was already reached and output has stopped.
    fn stuff(&mut self, out: &mut Vec<u8>) {
        if self.size < self.max_size {
            out.push(b'.');
        }
    }

    /// Reads a run of text, or one CR, LF or NUL; returns how many bytes it
    /// took (at least one; `input` is not empty). A run that ends in CR LF is
    /// taken whole with its line end: the common case, one search and one
    /// copy per line.
    fn text(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        self.state = State::Text;
        let run = memchr::memchr3(b'\r', b'\n', 0, input).unwrap_or(input.len());
        if input.get(run..run + 2) == Some(b"\r\n") {
            self.emit(&input[..run + 2], out);
            self.line_len = 0;
            self.state = State::LineStart;
            return run + 2;
        }
        if run > 0 {
            self.emit(&input[..run], out);
            return run;
        }
        match input[0] {
            b'\r' => self.state = State::Cr,
            // A bare LF is content, not a line end: a "." after it is not at
            // a line start, whatever a lenient backend would think.
            b'\n' => self.violate(DataViolation::BareLf),
            _ => self.violate(DataViolation::Nul),
        }
        self.emit(&input[..1], out);
        1
    }

    /// Appends unstuffed bytes, checking the limits in the order a
    /// byte-at-a-time reader would hit them, so the reported violation does
    /// not depend on how the input was split.
    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let n = bytes.len() as u64;
        let room_size = self.max_size.saturating_sub(self.size);
        let room_line = (self.max_line as u64).saturating_sub(self.line_len as u64);
        let over_size = n > room_size;
        let over_line = n > room_line;
        // The first offending byte decides; size wins a tie.
        if over_line && (!over_size || room_line < room_size) {
            self.violate(DataViolation::LineTooLong);
        }
        if over_size {
            self.violate(DataViolation::TooLarge);
        }
        if over_line {
            self.violate(DataViolation::LineTooLong);
        }
        // room_size is 0 once the limit has been passed.
        out.extend_from_slice(&bytes[..room_size.min(n) as usize]);
        self.line_len = self.line_len.saturating_add(bytes.len());
        self.size = self.size.saturating_add(n);
    }

    fn violate(&mut self, v: DataViolation) {
        if v == DataViolation::TooLarge {
            self.too_large = true;
        }
        self.violation.get_or_insert(v);
    }

    /// The first violation seen, if any.
    pub fn violation(&self) -> Option<DataViolation> {
        self.violation
    }

    /// Unstuffed octets seen so far, counted past the limit too, so the
    /// session can log how large the refused message was.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True once the size limit was passed (whatever the first violation).
    pub fn exceeded_size(&self) -> bool {
        self.too_large
    }

    /// True once the terminator has been consumed.
    pub fn is_complete(&self) -> bool {
        self.state == State::Done
    }
}

/// Bytes compared with the one before them at a time in [`first_bad_pair`].
const PAIR_BLOCK: usize = 32;

/// The first index `i` (at least 1) where `bytes[i]` and the byte before it
/// say the line needs attention: a CR not followed by LF, a LF not preceded
/// by CR, a dot at a line start, or a NUL.
fn first_bad_pair(bytes: &[u8]) -> Option<usize> {
    fn bad(a: u8, b: u8) -> u8 {
        ((a == b'\r') as u8 ^ (b == b'\n') as u8)
            | ((a == b'\n') as u8 & (b == b'.') as u8)
            | (b == 0) as u8
    }
    let (Some(before), Some(after)) = (bytes.get(..bytes.len().saturating_sub(1)), bytes.get(1..))
    else {
        return None;
    };
    let mut blocks_a = before.chunks_exact(PAIR_BLOCK);
    let mut blocks_b = after.chunks_exact(PAIR_BLOCK);
    let mut base = 0;
    for (a, b) in (&mut blocks_a).zip(&mut blocks_b) {
        // Fixed-size blocks: no bounds checks in the loop below.
        let a: &[u8; PAIR_BLOCK] = a.try_into().expect("chunks_exact gives whole blocks");
        let b: &[u8; PAIR_BLOCK] = b.try_into().expect("chunks_exact gives whole blocks");
        // Branch-free over the block, so it vectorises; found, then located.
        let mut any = 0;
        for j in 0..PAIR_BLOCK {
            any |= bad(a[j], b[j]);
        }
        if any != 0 {
            return (0..PAIR_BLOCK)
                .find(|&j| bad(a[j], b[j]) != 0)
                .map(|j| base + j + 1);
        }
        base += PAIR_BLOCK;
    }
    blocks_a
        .remainder()
        .iter()
        .zip(blocks_b.remainder())
        .position(|(&a, &b)| bad(a, b) != 0)
        .map(|j| base + j + 1)
}

/// Dot-stuffs a message on its way to the backend (RFC 5321 §4.5.2).
///
/// A CR or LF on its own counts as a line end here, unlike in
/// [`DataReceiver`]: if a bare line end ever reaches this point, the dot after
/// it is doubled, so a backend that accepts bare LF or CR as line ends still
/// cannot see `.` alone on a line and end the message early.
#[derive(Debug, Clone)]
pub struct DotStuffer {
    at_line_start: bool,
    /// The last two bytes pushed, to know whether the content ended in CRLF.
    last: [u8; 2],
    started: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl DotStuffer {
    pub fn new() -> Self {
        DotStuffer {
            at_line_start: true,
            last: [0, 0],
            started: false,
        }
    }

    /// Appends `chunk`, stuffed, to `out`. Chunks may split lines anywhere.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut copied = 0;
        for (i, &b) in chunk.iter().enumerate() {
            if b == b'.' && self.at_line_start {
                out.extend_from_slice(&chunk[copied..i]);
                out.push(b'.');
                copied = i;
            }
            self.at_line_start = b == b'\r' || b == b'\n';
        }
        out.extend_from_slice(&chunk[copied..]);
        match chunk {
            [] => {}
            [b] => self.last = [self.last[1], *b],
            [.., a, b] => self.last = [*a, *b],
        }
        self.started |= !chunk.is_empty();
    }

    /// Emits the terminator and resets the stuffer for the next message.
    ///
    /// The CRLF before the dot belongs to the message, so content that does
    /// not end in CRLF gets one added: `\r\n.\r\n`, and otherwise `.\r\n`. An
    /// empty message is sent as `.\r\n` alone, which the backend receives as
    /// empty rather than as one blank line.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.started && self.last != *b"\r\n" {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        *self = Self::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DataStatus::{Complete, NeedMore};
    use DataViolation::*;

    struct Run {
        out: Vec<u8>,
        consumed: usize,
        status: DataStatus,
        violation: Option<DataViolation>,
        size: u64,
    }

    /// Feeds the pieces in order, stopping at the first Complete as a session
    /// would.
    fn feed(max_line: usize, max_size: u64, pieces: &[&[u8]]) -> Run {
        feed_as(false, max_line, max_size, pieces)
    }

    /// What goes to the backend: `ingest_stuffed` in the given pieces.
    fn feed_stuffed(max_line: usize, max_size: u64, pieces: &[&[u8]]) -> Run {
        feed_as(true, max_line, max_size, pieces)
    }

    fn feed_as(stuffed: bool, max_line: usize, max_size: u64, pieces: &[&[u8]]) -> Run {
        let mut rx = DataReceiver::new(max_line, max_size);
        let mut out = Vec::new();
        let mut consumed = 0;
        let mut status = NeedMore;
        let ingest = |rx: &mut DataReceiver, piece: &[u8], out: &mut Vec<u8>| {
            if stuffed {
                rx.ingest_stuffed(piece, out)
            } else {
                rx.ingest(piece, out)
            }
        };
        for piece in pieces {
            let (n, st) = ingest(&mut rx, piece, &mut out);
            assert!(n <= piece.len());
            consumed += n;
            status = st;
            if st == Complete {
                assert_eq!(ingest(&mut rx, b"more", &mut out), (0, Complete));
                break;
            }
            assert_eq!(n, piece.len(), "NeedMore must consume everything");
        }
        assert_eq!(status == Complete, rx.is_complete());
        Run {
            out,
            consumed,
            status,
            violation: rx.violation(),
            size: rx.size(),
        }
    }

    /// (max_line, max_size, input, output, consumed, status, violation)
    type Case = (
        usize,
        u64,
        &'static [u8],
        &'static [u8],
        usize,
        DataStatus,
        Option<DataViolation>,
    );

    #[test]
    fn table() {
        #[rustfmt::skip]
        let cases: &[Case] = &[
            (1000, 1 << 20, b".\r\n", b"", 3, Complete, None),
            (1000, 1 << 20, b".\r\nQUIT\r\n", b"", 3, Complete, None),
            (1000, 1 << 20, b"\r\n.\r\n", b"\r\n", 5, Complete, None),
            (1000, 1 << 20, b"Hello\r\n.\r\n", b"Hello\r\n", 10, Complete, None),
            (1000, 1 << 20, b"Hello\r\n.\r\nQUIT\r\n", b"Hello\r\n", 10, Complete, None),
            (1000, 1 << 20, b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<a@b.example>\r\n", b"Subject: x\r\n\r\nbody\r\n", 23, Complete, None),
            // Dot-unstuffing.
            (1000, 1 << 20, b"..leading\r\n.\r\n", b".leading\r\n", 14, Complete, None),
            (1000, 1 << 20, b"a\r\n..\r\n.\r\n", b"a\r\n.\r\n", 10, Complete, None),
            (1000, 1 << 20, b"a\r\n...\r\n.\r\n", b"a\r\n..\r\n", 11, Complete, None),
            (1000, 1 << 20, b"..\r\n.\r\n", b".\r\n", 7, Complete, None),
            (1000, 1 << 20, b".x\r\n.\r\n", b"x\r\n", 7, Complete, None),
            (1000, 1 << 20, b"a.\r\n.\r\n", b"a.\r\n", 7, Complete, None),
            (1000, 1 << 20, b"a\r\n .\r\n.\r\n", b"a\r\n .\r\n", 10, Complete, None),
            // Smuggling variants are content, and flagged.
            (1000, 1 << 20, b"a\n.\nMAIL FROM:<x@y.example>\r\n.\r\n", b"a\n.\nMAIL FROM:<x@y.example>\r\n", 32, Complete, Some(BareLf)),
            (1000, 1 << 20, b"a\r\n.\nMAIL FROM:<x@y.example>\r\n.\r\n", b"a\r\n\nMAIL FROM:<x@y.example>\r\n", 33, Complete, Some(BareLf)),
            (1000, 1 << 20, b"a\n.\r\nMAIL FROM:<x@y.example>\r\n.\r\n", b"a\n.\r\nMAIL FROM:<x@y.example>\r\n", 33, Complete, Some(BareLf)),
            (1000, 1 << 20, b"a\r.\rMAIL FROM:<x@y.example>\r\n.\r\n", b"a\r.\rMAIL FROM:<x@y.example>\r\n", 32, Complete, Some(BareCr)),
            (1000, 1 << 20, b"a\r.\r\nb\r\n.\r\n", b"a\r.\r\nb\r\n", 11, Complete, Some(BareCr)),
            (1000, 1 << 20, b"a\r\n.\rb\r\n.\r\n", b"a\r\n\rb\r\n", 11, Complete, Some(BareCr)),
            (1000, 1 << 20, b"a\r\n.\r.\r\n.\r\n", b"a\r\n\r.\r\n", 11, Complete, Some(BareCr)),
            (1000, 1 << 20, b"a\r\n.\r\r\n.\r\n", b"a\r\n\r\r\n", 10, Complete, Some(BareCr)),
            (1000, 1 << 20, b"a\r\r\n.\r\n", b"a\r\r\n", 7, Complete, Some(BareCr)),
            (1000, 1 << 20, b"\n.\n", b"\n.\n", 3, NeedMore, Some(BareLf)),
            (1000, 1 << 20, b"a\r\n.\n", b"a\r\n\n", 5, NeedMore, Some(BareLf)),
            (1000, 1 << 20, b"a\n.\r\n", b"a\n.\r\n", 5, NeedMore, Some(BareLf)),
            (1000, 1 << 20, b"\r.\r\n", b"\r.\r\n", 4, NeedMore, Some(BareCr)),
            // NUL.
            (1000, 1 << 20, b"a\0b\r\n.\r\n", b"a\0b\r\n", 8, Complete, Some(Nul)),
            // Incomplete.
            (1000, 1 << 20, b"", b"", 0, NeedMore, None),
            (1000, 1 << 20, b"abc", b"abc", 3, NeedMore, None),
            (1000, 1 << 20, b"abc\r", b"abc\r", 4, NeedMore, None),
            (1000, 1 << 20, b"abc\r\n", b"abc\r\n", 5, NeedMore, None),
            (1000, 1 << 20, b"abc\r\n.", b"abc\r\n", 6, NeedMore, None),
            (1000, 1 << 20, b"abc\r\n.\r", b"abc\r\n", 7, NeedMore, None),
            (1000, 1 << 20, b".", b"", 1, NeedMore, None),
            // Line length, CRLF included; the stuffed dot does not count.
            (10, 1 << 20, b"01234567\r\n.\r\n", b"01234567\r\n", 13, Complete, None),
            (10, 1 << 20, b"..1234567\r\n.\r\n", b".1234567\r\n", 14, Complete, None),
            (10, 1 << 20, b"012345678\r\n.\r\n", b"012345678\r\n", 14, Complete, Some(LineTooLong)),
            (10, 1 << 20, b"0123456789ABCDEF\r\nok\r\n.\r\n", b"0123456789ABCDEF\r\nok\r\n", 25, Complete, Some(LineTooLong)),
            // Size: output stops at the limit, reading goes on.
            (1000, 5, b"abc\r\n.\r\n", b"abc\r\n", 8, Complete, None),
            (1000, 5, b"abc\r\nde\r\n.\r\n", b"abc\r\n", 12, Complete, Some(TooLarge)),
            (1000, 0, b".\r\n", b"", 3, Complete, None),
            (1000, 0, b"x\r\n.\r\n", b"", 6, Complete, Some(TooLarge)),
            // First violation wins.
            (1000, 1 << 20, b"a\nb\0\r\n.\r\n", b"a\nb\0\r\n", 9, Complete, Some(BareLf)),
            (1000, 3, b"a\nbcdef\r\n.\r\n", b"a\nb", 12, Complete, Some(BareLf)),
            (4, 3, b"abcdef\r\n.\r\n", b"abc", 11, Complete, Some(TooLarge)),
            (3, 4, b"abcdef\r\n.\r\n", b"abcd", 11, Complete, Some(LineTooLong)),
            (3, 3, b"abcdef\r\n.\r\n", b"abc", 11, Complete, Some(TooLarge)),
        ];
        for &(max_line, max_size, input, output, consumed, status, violation) in cases {
            let name = String::from_utf8_lossy(input);
            let whole = feed(max_line, max_size, &[input]);
            assert_eq!(whole.out, output, "output for {name:?}");
            assert_eq!(whole.consumed, consumed, "consumed for {name:?}");
            assert_eq!(whole.status, status, "status for {name:?}");
            assert_eq!(whole.violation, violation, "violation for {name:?}");

            // Every split into two and three pieces gives the same result.
            let same = |run: Run, how: String| {
                assert_eq!(run.out, output, "{name:?} {how}");
                assert_eq!(run.consumed, consumed, "{name:?} {how}");
                assert_eq!(run.status, status, "{name:?} {how}");
                assert_eq!(run.violation, violation, "{name:?} {how}");
                assert_eq!(run.size, whole.size, "{name:?} {how}");
            };
            for i in 0..=input.len() {
                let (a, rest) = input.split_at(i);
                same(feed(max_line, max_size, &[a, rest]), format!("split {i}"));
                for j in 0..=rest.len() {
                    let (b, c) = rest.split_at(j);
                    same(
                        feed(max_line, max_size, &[a, b, c]),
                        format!("split {i},{}", i + j),
                    );
                }
            }
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            same(feed(max_line, max_size, &bytes), "byte by byte".into());
        }
    }

    #[test]
    fn size_is_counted_past_the_limit() {
        let run = feed(1000, 5, &[b"abc\r\nde\r\n.\r\n"]);
        assert_eq!(run.size, 9);
        let mut rx = DataReceiver::new(1000, 5);
        let mut out = Vec::new();
        rx.ingest(b"a\nbcdef\r\n", &mut out);
        assert_eq!(rx.violation(), Some(BareLf));
        assert!(rx.exceeded_size());
        assert_eq!(out.len(), 5);
    }

    #[test]
    fn large_message_in_odd_chunks() {
        let mut msg = Vec::new();
        for i in 0..2000 {
            msg.extend_from_slice(
                format!("{}line {i}\r\n", if i % 7 == 0 { "." } else { "" }).as_bytes(),
            );
        }
        let mut wire = Vec::new();
        let mut st = DotStuffer::new();
        st.push(&msg, &mut wire);
        st.finish(&mut wire);
        wire.extend_from_slice(b"QUIT\r\n");
        let pieces: Vec<&[u8]> = wire.chunks(997).collect();
        let run = feed(1000, 1 << 20, &pieces);
        assert_eq!(run.out, msg);
        assert_eq!(run.consumed, wire.len() - 6);
        assert_eq!(run.violation, None);
    }

    fn stuff(chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut st = DotStuffer::new();
        for c in chunks {
            st.push(c, &mut out);
        }
        st.finish(&mut out);
        out
    }

    #[test]
    fn stuffer_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"\r\n", b"\r\n.\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b".", b"..\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (b"a\r\n.\r\nb", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"..x", b"...x\r\n.\r\n"),
            (b"a.b\r\n", b"a.b\r\n.\r\n"),
            // Bare line ends: the dot is doubled all the same.
            (b"a\n.\n", b"a\n..\n\r\n.\r\n"),
            (b"a\r.\r", b"a\r..\r\r\n.\r\n"),
            (b"a\n", b"a\n\r\n.\r\n"),
            (b"a\r", b"a\r\r\n.\r\n"),
        ];
        for (input, want) in cases {
            assert_eq!(
                stuff(&[input]),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
            for i in 0..=input.len() {
                let (a, b) = input.split_at(i);
                assert_eq!(stuff(&[a, b]), *want, "split {i}");
                let bytes: Vec<&[u8]> = input.chunks(1).collect();
                assert_eq!(stuff(&bytes), *want);
            }
        }
    }

    #[test]
    fn stuffer_resets_after_finish() {
        let mut st = DotStuffer::default();
        let mut out = Vec::new();
        st.push(b"a", &mut out);
        st.finish(&mut out);
        st.push(b".", &mut out);
        st.finish(&mut out);
        assert_eq!(out, b"a\r\n.\r\n..\r\n.\r\n");
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        /// Splits `data` into random pieces, some empty.
        fn pieces<'a>(&mut self, data: &'a [u8]) -> Vec<&'a [u8]> {
            let mut out = Vec::new();
            let mut rest = data;
            while !rest.is_empty() {
                let n = self.below(rest.len().min(8) + 1);
                let (a, b) = rest.split_at(n);
                out.push(a);
                rest = b;
            }
            out
        }
    }

    /// The whole lines at the start of `input` that need no attention,
    /// found the plain way: one line at a time.
    fn clean_prefix(input: &[u8], max_line: usize, room: usize) -> usize {
        let mut end = 0;
        while let Some(lf) = input[end..].iter().position(|&b| b == b'\n') {
            let line = &input[end..end + lf + 1];
            let body = &line[..line.len() - 1];
            let clean = line.len() >= 2
                && body.last() == Some(&b'\r')
                && !body[..body.len() - 1]
                    .iter()
                    .any(|&b| matches!(b, b'\r' | b'\n' | 0))
                && line[0] != b'.'
                && line.len() <= max_line
                && end + line.len() <= room;
            if !clean {
                break;
            }
            end += line.len();
        }
        end
    }

    /// The bulk path takes exactly the longest run of clean whole lines
    /// (never a line the state machine must see), and says it examined at
    /// least one byte when it takes none.
    #[test]
    fn bulk_lines_are_the_longest_clean_prefix() {
        let mut rng = Rng(0x5eed_1234_abcd_0042);
        let alphabet: &[u8] = b"aaaaaaaaaaaaaaaa\r\n\r\n\r\n.\0";
        for round in 0..20_000 {
            let len = rng.below(if round % 10 == 0 { 400 } else { 60 });
            let mut input: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            // Mostly well-formed lines, so that long clean runs occur.
            if round % 2 == 0 {
                input = input
                    .split(|&b| b == b'\n')
                    .map(|l| {
                        l.iter()
                            .filter(|&&b| b != b'\r')
                            .copied()
                            .collect::<Vec<u8>>()
                    })
                    .collect::<Vec<_>>()
                    .join(&b"\r\n"[..]);
            }
            if input.first() == Some(&b'.') {
                continue; // the caller never asks at a dot
            }
            let max_line = 2 + rng.below(40);
            let max_size = rng.below(500) as u64;
            let mut r = DataReceiver::new(max_line, max_size);
            let (taken, examined) = r.lines(&input);
            let want = clean_prefix(&input, max_line, max_size as usize);
            assert_eq!(
                taken,
                want,
                "input {:?} max_line {max_line} max_size {max_size}",
                String::from_utf8_lossy(&input)
            );
            assert_eq!(r.size(), taken as u64);
            if taken == 0 && !input.is_empty() {
                assert!(examined >= 1);
            }
        }
    }

    /// The relay path (a long run of lines left in the read buffer) puts
    /// together exactly what `ingest_stuffed` appends, piece for piece,
    /// with the same end, size and verdict, whatever the reads look like.
    #[test]
    fn relayed_pieces_are_the_stuffed_output() {
        let mut rng = Rng(0x0dd_ba11_cafe_f00d);
        let lines: &[&[u8]] = &[
            b"Subject: a long enough line of ordinary text for the test\r\n",
            b"just text\r\n",
            b"\r\n",
            b"..stuffed\r\n",
            b"bare\nLF\r\n",
            b"bare\rCR\r\n",
            b"nul\0\r\n",
            b".\r\n",
            b"\r\n.\r\nQUIT\r\n",
        ];
        let mut passed_runs = 0;
        for round in 0..3000 {
            let mut input = Vec::new();
            let count = rng.below(if round % 4 == 0 { 800 } else { 40 });
            for _ in 0..count {
                // Mostly ordinary lines, so that long clean runs occur.
                let line = if rng.below(200) == 0 {
                    lines[rng.below(lines.len())]
                } else {
                    lines[rng.below(3)]
                };
                input.extend_from_slice(line);
            }
            let max_line = if round % 3 == 0 { 40 } else { 1000 };
            let max_size = if round % 5 == 0 {
                rng.below(20_000) as u64
            } else {
                u64::MAX
            };
            // Reads of up to 8 KB, as a session's socket would give them.
            let mut reads = Vec::new();
            let mut rest = &input[..];
            while !rest.is_empty() {
                let (a, b) = rest.split_at(rest.len().min(1 + rng.below(8192)));
                reads.push(a);
                rest = b;
            }
            let mut plain = DataReceiver::new(max_line, max_size);
            let mut relay = DataReceiver::new(max_line, max_size);
            for read in reads {
                let mut want = Vec::new();
                let (n, status) = plain.ingest_stuffed(read, &mut want);
                let mut out = Vec::new();
                let (m, relayed, passed) = relay.ingest_relay(read, &mut out);
                assert_eq!((m, relayed), (n, status));
                let got = match &passed {
                    Some(p) => {
                        passed_runs += 1;
                        assert!(p.range.len() >= PASS_MIN && p.range.end <= m);
                        [&out[..p.at], &read[p.range.clone()], &out[p.at..]].concat()
                    }
                    None => out,
                };
                assert_eq!(got, want, "round {round}");
                assert_eq!(relay.size(), plain.size());
                assert_eq!(relay.violation(), plain.violation());
                if status == Complete {
                    break;
                }
            }
        }
        assert!(passed_runs > 100, "only {passed_runs} runs were passed on");
    }

    /// What the receiver must give back for a stuffed message.
    fn normalized(m: &[u8]) -> Vec<u8> {
        let mut m = m.to_vec();
        if !m.is_empty() && !m.ends_with(b"\r\n") {
            m.extend_from_slice(b"\r\n");
        }
        m
    }

    fn has_bare_line_end(m: &[u8]) -> bool {
        m.iter().enumerate().any(|(i, &b)| {
            (b == b'\r' && m.get(i + 1) != Some(&b'\n'))
                || (b == b'\n' && (i == 0 || m[i - 1] != b'\r'))
        })
    }

    /// Stuffs `m` in random pieces, receives it in random pieces with a
    /// pipelined command behind it, and checks the round trip.
    fn round_trip(rng: &mut Rng, m: &[u8]) {
        let stuffed = stuff(&rng.pieces(m));
        let mut wire = stuffed.clone();
        wire.extend_from_slice(b"QUIT\r\n");
        let run = feed(usize::MAX, u64::MAX, &rng.pieces(&wire));
        // The end is found exactly where the stuffer put it, never earlier.
        assert_eq!(run.status, Complete, "{m:?}");
        assert_eq!(run.consumed, stuffed.len(), "{m:?}");
        if has_bare_line_end(m) {
            assert!(run.violation.is_some(), "{m:?}");
        } else {
            assert_eq!(run.out, normalized(m), "{m:?}");
        }
    }

    #[test]
    fn stuff_then_receive_round_trips() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let well_formed: &[&[u8]] = &[b".", b"..", b"\r\n", b"a", b"b c", b"\0", b"MAIL", b".\r\n"];
        let anything: &[&[u8]] = &[b".", b"\r", b"\n", b"\r\n", b"a", b" "];
        for round in 0..5000 {
            let alphabet = if round % 2 == 0 {
                well_formed
            } else {
                anything
            };
            let mut m = Vec::new();
            for _ in 0..rng.below(24) {
                m.extend_from_slice(alphabet[rng.below(alphabet.len())]);
            }
            round_trip(&mut rng, &m);
        }
    }

    #[test]
    fn well_formed_messages_round_trip_exactly() {
        let mut rng = Rng(42);
        for _ in 0..2000 {
            let mut m = Vec::new();
            for _ in 0..rng.below(6) {
                m.resize(m.len() + rng.below(4), b'.');
                m.extend_from_slice(&b"text."[..rng.below(6)]);
                m.extend_from_slice(b"\r\n");
            }
            let stuffed = stuff(&rng.pieces(&m));
            let run = feed(1000, 1 << 20, &rng.pieces(&stuffed));
            assert_eq!(run.out, m);
            assert_eq!(run.violation, None);
            assert_eq!(run.consumed, stuffed.len());
        }
    }

    /// The wire form is the stuffer applied to the unstuffed form, without
    /// the terminator, for every message without a violation; the end, size
    /// and violation are found exactly as `ingest` finds them.
    fn same_as_stuffer(max_line: usize, max_size: u64, pieces: &[&[u8]]) {
        let plain = feed(max_line, max_size, pieces);
        let wire = feed_stuffed(max_line, max_size, pieces);
        let name = String::from_utf8_lossy(&pieces.concat()).into_owned();
        assert_eq!(
            (wire.consumed, wire.status, wire.violation, wire.size),
            (plain.consumed, plain.status, plain.violation, plain.size),
            "{name:?}"
        );
        if plain.violation.is_none() && plain.status == Complete {
            let mut want = stuff(&[&plain.out]);
            want.truncate(want.len() - 3);
            assert_eq!(wire.out, want, "{name:?}");
        }
    }

    #[test]
    fn stuffed_output_table() {
        #[rustfmt::skip]
        let cases: &[(&[u8], &[u8])] = &[
            (b".\r\n", b""),
            (b"Hello\r\n.\r\nQUIT\r\n", b"Hello\r\n"),
            (b"..leading\r\n.\r\n", b"..leading\r\n"),
            (b"a\r\n..\r\n.\r\n", b"a\r\n..\r\n"),
            (b"a\r\n...\r\n.\r\n", b"a\r\n...\r\n"),
            // An unstuffed leading dot (a non-compliant client) was dropped
            // by the receiver; the wire form agrees with what it kept.
            (b".x\r\n.\r\n", b"x\r\n"),
            (b"a.\r\n .\r\n.\r\n", b"a.\r\n .\r\n"),
        ];
        for &(input, output) in cases {
            let whole = feed_stuffed(1000, 1 << 20, &[input]);
            assert_eq!(whole.out, output, "{:?}", String::from_utf8_lossy(input));
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            let split = feed_stuffed(1000, 1 << 20, &bytes);
            assert_eq!(
                split.out,
                output,
                "{:?} byte by byte",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn stuffed_output_matches_the_stuffer() {
        let mut rng = Rng(7);
        let alphabet: &[&[u8]] = &[
            b".", b"..", b"\r\n", b"\r", b"\n", b"a", b"b c", b"\0", b".\r\n",
        ];
        for round in 0..5000 {
            let mut m = Vec::new();
            for _ in 0..rng.below(24) {
                m.extend_from_slice(alphabet[rng.below(alphabet.len())]);
            }
            m.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
            let (max_line, max_size) = if round % 3 == 0 {
                (1 + rng.below(12), rng.below(40) as u64)
            } else {
                (1000, 1 << 20)
            };
            same_as_stuffer(max_line, max_size, &rng.pieces(&m));
            same_as_stuffer(max_line, max_size, &[&m]);
        }
    }
}
