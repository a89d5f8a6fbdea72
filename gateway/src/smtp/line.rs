//! Framing of client command lines.
//!
//! The session reads from the socket into a `BytesMut` it owns and asks the
//! [`LineReader`] for whole lines. The reader never lets the buffer grow past
//! the line limit: an overlong line is thrown away as it arrives, so a client
//! cannot make us hold an unbounded amount of memory by never sending LF.

use bytes::{Buf, Bytes, BytesMut};

/// Why a line was refused. The offending line is always consumed, so the
/// session can answer and carry on reading the next command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineError {
    /// Longer than the limit (including CRLF). Reported once, when the end of
    /// the line has arrived, so the reply lines up with the command the client
    /// thinks it sent.
    TooLong,
    /// Ended by LF without CR. RFC 5321 §2.3.8 only knows CRLF; accepting a
    /// bare LF is how pipelining and smuggling ambiguities start.
    BareLf,
    /// Contained a NUL byte, which no SMTP command may carry and which many C
    /// MTAs would treat as the end of the string.
    Nul,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LineError::TooLong => "line too long",
            LineError::BareLf => "line ended with bare LF",
            LineError::Nul => "line contains NUL",
        })
    }
}

impl std::error::Error for LineError {}

/// Splits a byte stream into CRLF-terminated lines of bounded length.
#[derive(Debug, Clone)]
pub struct LineReader {
    max_len: usize,
    /// Set while we are dropping the tail of an overlong line; the error is
    /// reported once its LF arrives.
    discarding: bool,
}

impl LineReader {
    /// `max_len` counts the CRLF (RFC 5321 §4.5.3.1.4: 512 for commands; AUTH
    /// exchanges need more, RFC 4954 suggests 12288). Values below 2 are
    /// raised to 2, the length of an empty line.
    pub fn new(max_len: usize) -> Self {
        LineReader {
            max_len: max_len.max(2),
            discarding: false,
        }
    }

    /// The limit this reader enforces, including CRLF.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// True while the tail of an overlong line is being dropped.
    pub fn is_discarding(&self) -> bool {
        self.discarding
    }

    /// Forgets a partially discarded line, e.g. when the session drops its
    /// buffer at STARTTLS.
    pub fn reset(&mut self) {
        self.discarding = false;
    }

    /// Takes the next complete line (without its CRLF) out of `buf`.
    ///
    /// `None` means more data is needed. While an overlong line is being
    /// discarded, its bytes are removed from `buf` as they arrive so memory
    /// stays bounded by `max_len`; `Err(TooLong)` is returned once, when its
    /// LF has been seen. The checks are applied in the order TooLong, BareLf,
    /// Nul; every error consumes the offending line.
    pub fn next_line(&mut self, buf: &mut BytesMut) -> Option<Result<Bytes, LineError>> {
        let lf = buf.iter().position(|&b| b == b'\n');
        if self.discarding {
            return match lf {
                Some(i) => {
                    buf.advance(i + 1);
                    self.discarding = false;
                    Some(Err(LineError::TooLong))
                }
                None => {
                    buf.clear();
                    None
                }
            };
        }
        let Some(i) = lf else {
            // Without an LF the line is at least buf.len() + 1 octets long, so
            // once the buffer holds max_len octets it can no longer fit.
            if buf.len() >= self.max_len {
                buf.clear();
                self.discarding = true;
            }
            return None;
        };
        let line = buf.split_to(i + 1).freeze();
        if line.len() > self.max_len {
            return Some(Err(LineError::TooLong));
        }
        if i == 0 || line[i - 1] != b'\r' {
            return Some(Err(LineError::BareLf));
        }
        let line = line.slice(..i - 1);
        if line.contains(&0) {
            return Some(Err(LineError::Nul));
        }
        Some(Ok(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Item = Result<&'static [u8], LineError>;

    /// Feeds `input` to a reader in the given pieces and collects every line.
    fn run(max: usize, pieces: &[&[u8]]) -> (Vec<Result<Vec<u8>, LineError>>, usize) {
        let mut reader = LineReader::new(max);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut peak = 0;
        for piece in pieces {
            buf.extend_from_slice(piece);
            peak = peak.max(buf.len());
            while let Some(item) = reader.next_line(&mut buf) {
                got.push(item.map(|b| b.to_vec()));
            }
            // What is left over is never more than one partial line.
            assert!(buf.len() < max.max(2), "buffer kept {} bytes", buf.len());
        }
        (got, peak)
    }

    fn expect(items: &[Item]) -> Vec<Result<Vec<u8>, LineError>> {
        items
            .iter()
            .map(|r| r.clone().map(|b| b.to_vec()))
            .collect()
    }

    /// (max_len, input, lines, left in buffer)
    type Case = (usize, &'static [u8], &'static [Item], &'static [u8]);

    #[test]
    fn table() {
        use LineError::*;
        let cases: &[Case] = &[
            (512, b"", &[], b""),
            (512, b"EHLO x", &[], b"EHLO x"),
            (512, b"EHLO x\r", &[], b"EHLO x\r"),
            (512, b"EHLO x\r\n", &[Ok(b"EHLO x")], b""),
            (512, b"\r\n", &[Ok(b"")], b""),
            (512, b"A\r\nB\r\nC", &[Ok(b"A"), Ok(b"B")], b"C"),
            (512, b"A\nB\r\n", &[Err(BareLf), Ok(b"B")], b""),
            (512, b"\n", &[Err(BareLf)], b""),
            (512, b"A\r\r\n", &[Ok(b"A\r")], b""),
            (512, b"A\0B\r\nC\r\n", &[Err(Nul), Ok(b"C")], b""),
            (512, b"\0\n", &[Err(BareLf)], b""),
            // Exactly at the limit (6 octets incl. CRLF) and one over.
            (6, b"ABCD\r\n", &[Ok(b"ABCD")], b""),
            (6, b"ABCDE\r\nX\r\n", &[Err(TooLong), Ok(b"X")], b""),
            (6, b"ABCDE\n", &[Err(BareLf)], b""),
            (6, b"ABCDEF\n", &[Err(TooLong)], b""),
            (6, b"ABCDEFGHIJ\r\nOK\r\n", &[Err(TooLong), Ok(b"OK")], b""),
            (6, b"ABCDEFGHIJ", &[], b""),
            (6, b"ABCDEFGHIJ\r", &[], b""),
            // A too-long line ended by a bare LF is still just too long.
            (6, b"ABCDEFGHIJ\nOK\r\n", &[Err(TooLong), Ok(b"OK")], b""),
            // Tiny limits are raised to 2.
            (0, b"\r\nA\r\n", &[Ok(b""), Err(TooLong)], b""),
        ];
        for (max, input, lines, rest) in cases {
            let mut reader = LineReader::new(*max);
            let mut buf = BytesMut::from(&input[..]);
            let mut got = Vec::new();
            while let Some(item) = reader.next_line(&mut buf) {
                got.push(item.map(|b| b.to_vec()));
            }
            assert_eq!(
                got,
                expect(lines),
                "input {:?}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(
                &buf[..],
                *rest,
                "rest for {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn every_split_gives_the_same_lines() {
        let inputs: &[&[u8]] = &[
            b"EHLO client.example\r\nMAIL FROM:<a@b>\r\n",
            b"A\nB\r\nC\0\r\n\r\nD\r\n",
            b"0123456789ABCDEF\r\nshort\r\n0123456789ABCDEF\nx\r\n",
            b"\r\r\n\n\r\n",
        ];
        for input in inputs {
            let (whole, _) = run(12, &[input]);
            for i in 0..=input.len() {
                let (a, b) = input.split_at(i);
                assert_eq!(run(12, &[a, b]).0, whole, "split at {i} of {input:?}");
                for j in i..=input.len() {
                    let (b, c) = input[i..].split_at(j - i);
                    assert_eq!(run(12, &[a, b, c]).0, whole, "split at {i},{j}");
                }
            }
            // One byte at a time.
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(run(12, &bytes).0, whole);
        }
    }

    #[test]
    fn overlong_line_is_discarded_as_it_arrives() {
        let mut reader = LineReader::new(16);
        let mut buf = BytesMut::new();
        for _ in 0..1000 {
            buf.extend_from_slice(b"xxxxxxxxxx");
            assert_eq!(reader.next_line(&mut buf), None);
            assert!(buf.len() < 16);
        }
        assert!(reader.is_discarding());
        buf.extend_from_slice(b"tail\r\nQUIT\r\n");
        assert_eq!(reader.next_line(&mut buf), Some(Err(LineError::TooLong)));
        assert_eq!(
            reader.next_line(&mut buf),
            Some(Ok(Bytes::from_static(b"QUIT")))
        );
        assert_eq!(reader.next_line(&mut buf), None);
        assert!(!reader.is_discarding());
    }

    #[test]
    fn too_long_is_reported_exactly_once() {
        let (got, peak) = run(8, &[b"AAAAAAAA", b"AAAAAAAA", b"AAAA\r", b"\n", b"OK\r\n"]);
        assert_eq!(got, expect(&[Err(LineError::TooLong), Ok(b"OK")]));
        assert!(peak <= 16);
    }

    #[test]
    fn reset_forgets_discarding() {
        let mut reader = LineReader::new(4);
        let mut buf = BytesMut::from(&b"toolong"[..]);
        assert_eq!(reader.next_line(&mut buf), None);
        assert!(reader.is_discarding());
        reader.reset();
        buf.extend_from_slice(b"OK\r\n");
        assert_eq!(
            reader.next_line(&mut buf),
            Some(Ok(Bytes::from_static(b"OK")))
        );
    }
}
