//! Finds the addresses of the `From:` header while a message streams by,
//! for the policy's optional header-From binding. Sans-IO: fed the
//! unstuffed message in pieces; only the header section is looked at and
//! only a bounded amount of it is kept.

/// Header sections larger than this are not scanned further (the part
/// scanned still counts): a limit, not a parser for hostile input.
const MAX_HEADER: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct HeaderFromScanner {
    header: Vec<u8>,
    done: bool,
}

impl HeaderFromScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next piece of the message.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.done {
            return;
        }
        let room = MAX_HEADER.saturating_sub(self.header.len());
        self.header
            .extend_from_slice(&chunk[..chunk.len().min(room)]);
        if let Some(end) = find(&self.header, b"\r\n\r\n") {
            self.header.truncate(end + 2);
            self.done = true;
        } else if self.header.len() >= MAX_HEADER {
            self.done = true;
        }
    }

    /// The addresses of every `From:` field (usually one, with one
    /// mailbox): `<addr>` forms, or the bare addr-spec; comments dropped.
    pub fn addresses(&self) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.header);
        // Unfold: a line starting with space or tab continues the field.
        let unfolded = text.replace("\r\n ", " ").replace("\r\n\t", " ");
        let mut out = Vec::new();
        for line in unfolded.split("\r\n") {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            if !name.trim().eq_ignore_ascii_case("from") {
                continue;
            }
            out.extend(mailbox_addresses(value));
        }
        out
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `Name <a@b>, c@d (comment)` → `a@b`, `c@d`. Commas inside quoted
/// display names do not split.
fn mailbox_addresses(value: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let (mut depth, mut quoted, mut start) = (0i32, false, 0usize);
    let bytes = value.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b'<' if !quoted => depth += 1,
            b'>' if !quoted => depth -= 1,
            b',' if !quoted && depth <= 0 => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts
        .into_iter()
        .filter_map(|p| {
            let p = strip_comments(p);
            let addr = match (p.rfind('<'), p.rfind('>')) {
                (Some(a), Some(b)) if a < b => p[a + 1..b].trim().to_string(),
                _ => p.trim().to_string(),
            };
            (!addr.is_empty()).then_some(addr)
        })
        .collect()
}

fn strip_comments(s: &str) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' if depth > 0 => depth -= 1,
            c if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(pieces: &[&str]) -> Vec<String> {
        let mut s = HeaderFromScanner::new();
        for p in pieces {
            s.push(p.as_bytes());
        }
        s.addresses()
    }

    #[test]
    fn from_addresses_table() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["From: a@x.test\r\nSubject: s\r\n\r\nbody"], &["a@x.test"]),
            (&["From: Alice <alice@x.test>\r\n\r\n"], &["alice@x.test"]),
            (
                &["FROM:", " \"Boss, The\" <ceo@x.test>\r\n\r\n"],
                &["ceo@x.test"],
            ),
            (
                &["From: a@x.test (Alice), Bob <b@y.test>\r\n\r\n"],
                &["a@x.test", "b@y.test"],
            ),
            (
                &["From: Alice\r\n <alice@x.test>\r\n\r\n"],
                &["alice@x.test"],
            ),
            (&["Subject: no from\r\n\r\nFrom: body@x.test\r\n"], &[]),
            (
                &["Received: x\r\nFrom: <a@x.test>\r\nFrom: <b@x.test>\r\n\r\n"],
                &["a@x.test", "b@x.test"],
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(scan(input), *expected, "{input:?}");
        }
    }

    #[test]
    fn header_kept_bounded() {
        let mut s = HeaderFromScanner::new();
        for _ in 0..10_000 {
            s.push(b"X-Filler: 0123456789012345678901234567890123456789\r\n");
        }
        assert!(s.header.len() <= MAX_HEADER);
    }
}
