//! A problem at a place in a configuration document.
//!
//! The gateway configuration, the users file and the policy file all report
//! a problem as `file:line:column: field `path`: message`, so an operator
//! can fix it without guessing. This is the one type that carries those
//! parts and the one place that formats them; the error enums of each layer
//! wrap it.

use std::fmt;

/// Where a problem is (file, line, column, field) and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The file (or whatever names the text in errors).
    pub origin: String,
    /// 1-based; `None` when no position is known.
    pub line: Option<usize>,
    /// 1-based; shown only together with a line.
    pub column: Option<usize>,
    /// The path inside the document, such as `rules[2].groups[0]`; `.` is
    /// the document itself (serde_path_to_error's name for it), and empty
    /// means no field.
    pub field: String,
    pub message: String,
    /// Whether a `field` of `.` is named in the message. The users and
    /// policy files leave it out; the gateway configuration has always
    /// named it (`field `.`: missing field ...`), and messages stay byte
    /// for byte what operators have seen.
    pub name_document: bool,
}

impl Located {
    /// A problem found by a check that runs after parsing.
    pub fn new(
        origin: impl Into<String>,
        line: Option<usize>,
        column: Option<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Located {
            origin: origin.into(),
            line,
            column,
            field: field.into(),
            message: message.into(),
            name_document: false,
        }
    }

    /// A problem the YAML deserializer found, with its position and field
    /// path.
    pub fn from_yaml_error(
        origin: &str,
        e: serde_path_to_error::Error<serde_norway::Error>,
    ) -> Self {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let loc = inner.location();
        Located::new(
            origin,
            loc.as_ref().map(|l| l.line()),
            loc.as_ref().map(|l| l.column()),
            field,
            strip_location(&inner.to_string()),
        )
    }
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, ":{l}:{c}")?,
            (Some(l), None) => write!(f, ":{l}")?,
            _ => {}
        }
        f.write_str(": ")?;
        let named = match self.field.as_str() {
            "" => false,
            "." => self.name_document,
            _ => true,
        };
        if named {
            write!(f, "field `{}`: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Located {}

/// serde_norway appends " at line L column C" to messages; the location is
/// reported separately, so drop the duplicate.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let at = |line, column, field: &str| Located::new("f.yaml", line, column, field, "bad");
        assert_eq!(
            at(Some(3), Some(5), "a.b").to_string(),
            "f.yaml:3:5: field `a.b`: bad"
        );
        assert_eq!(
            at(Some(3), None, "a").to_string(),
            "f.yaml:3: field `a`: bad"
        );
        assert_eq!(at(None, Some(5), "a").to_string(), "f.yaml: field `a`: bad");
        assert_eq!(at(None, None, "").to_string(), "f.yaml: bad");
        assert_eq!(at(Some(1), Some(1), ".").to_string(), "f.yaml:1:1: bad");
        let mut root = at(Some(1), Some(1), ".");
        root.name_document = true;
        assert_eq!(root.to_string(), "f.yaml:1:1: field `.`: bad");
    }

    #[test]
    fn yaml_errors_keep_position_and_path_once() {
        type Doc = std::collections::BTreeMap<String, u8>;
        let de = serde_norway::Deserializer::from_str("n: x\n");
        let e = serde_path_to_error::deserialize::<_, Doc>(de).unwrap_err();
        let l = Located::from_yaml_error("d.yaml", e);
        assert_eq!((l.line, l.field.as_str()), (Some(1), "n"));
        assert!(!l.message.contains(" at line "), "{l}");
    }
}
