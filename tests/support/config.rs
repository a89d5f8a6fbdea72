//! Gateway configurations for tests, as YAML text.
//!
//! ```
//! # use relayguard_e2e::Config;
//! # let backend = "127.0.0.1:2525".parse().unwrap();
//! let yaml = Config::new(&[backend])
//!     .set("limits.max_message_size", "2048")
//!     .listener("submissions", &[("tls", "implicit")])
//!     .yaml();
//! assert!(yaml.contains("  max_message_size: 2048\n"));
//! ```

use std::net::SocketAddr;
use std::path::Path;

/// A YAML mapping kept in insertion order; values are raw YAML text.
#[derive(Debug, Clone, Default)]
struct Map(Vec<(String, Node)>);

#[derive(Debug, Clone)]
enum Node {
    Value(String),
    Map(Map),
}

impl Map {
    fn set(&mut self, path: &[&str], value: &str) {
        let (first, rest) = path.split_first().expect("empty config key");
        let pos = self.0.iter().position(|(k, _)| k == first);
        if rest.is_empty() {
            let node = Node::Value(value.to_string());
            match pos {
                Some(i) => self.0[i].1 = node,
                None => self.0.push((first.to_string(), node)),
            }
            return;
        }
        let i = pos.unwrap_or_else(|| {
            self.0.push((first.to_string(), Node::Map(Map::default())));
            self.0.len() - 1
        });
        if let Node::Value(_) = self.0[i].1 {
            self.0[i].1 = Node::Map(Map::default());
        }
        if let Node::Map(m) = &mut self.0[i].1 {
            m.set(rest, value);
        }
    }

    fn render(&self, indent: usize, out: &mut String) {
        for (k, v) in &self.0 {
            out.push_str(&" ".repeat(indent));
            match v {
                Node::Value(s) => out.push_str(&format!("{k}: {s}\n")),
                Node::Map(m) => {
                    out.push_str(&format!("{k}:\n"));
                    m.render(indent + 2, out);
                }
            }
        }
    }
}

/// A gateway configuration: one plain listener `smtp` on 127.0.0.1:0, the
/// given backend servers, `example.test` as the only local domain, and
/// backend timeouts short enough that a broken test fails quickly.
#[derive(Debug, Clone)]
pub struct Config {
    listeners: Vec<Vec<(String, String)>>,
    rest: Map,
}

/// Quotes a path for YAML.
pub(crate) fn yaml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

impl Config {
    pub fn new(servers: &[SocketAddr]) -> Config {
        let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
        let c = Config {
            listeners: Vec::new(),
            rest: Map::default(),
        };
        c.listener("smtp", &[])
            .set("hostname", "relay.test")
            .set("backend.servers", &format!("[{}]", servers.join(", ")))
            .set("backend.timeouts.connect", "5s")
            .set("backend.timeouts.greeting", "15s")
            .set("backend.timeouts.command", "15s")
            .set("backend.timeouts.data_init", "15s")
            .set("backend.timeouts.data_block", "15s")
            .set("backend.timeouts.data_done", "15s")
            .set("policy.local_domains", "[example.test]")
            .set("shutdown.drain_timeout", "15s")
    }

    /// Sets `dotted.key` to a raw YAML value, e.g. `("smtp.vrfy", "not_implemented")`.
    pub fn set(mut self, key: &str, value: &str) -> Config {
        let path: Vec<&str> = key.split('.').collect();
        self.rest.set(&path, value);
        self
    }

    /// Adds a listener on 127.0.0.1:0 (or replaces the one of that name)
    /// with extra fields, e.g. `&[("tls", "implicit")]`.
    pub fn listener(mut self, name: &str, fields: &[(&str, &str)]) -> Config {
        let mut l = vec![
            ("name".to_string(), name.to_string()),
            ("address".to_string(), "127.0.0.1:0".to_string()),
        ];
        for (k, v) in fields {
            match l.iter_mut().find(|(lk, _)| lk == k) {
                Some(e) => e.1 = v.to_string(),
                None => l.push((k.to_string(), v.to_string())),
            }
        }
        self.listeners.retain(|x| x[0].1 != name);
        self.listeners.push(l);
        self
    }

    /// A top-level `tls` certificate, used by every listener that offers TLS.
    pub fn tls(self, cert: &Path, key: &Path) -> Config {
        self.set("tls.certificate", &yaml_path(cert))
            .set("tls.key", &yaml_path(key))
    }

    pub fn yaml(&self) -> String {
        let mut out = String::from("listeners:\n");
        for l in &self.listeners {
            for (i, (k, v)) in l.iter().enumerate() {
                out.push_str(if i == 0 { "  - " } else { "    " });
                out.push_str(&format!("{k}: {v}\n"));
            }
        }
        self.rest.render(0, &mut out);
        out
    }
}

/// The usual configuration in one call: one backend and some dotted-key
/// settings, e.g. `config(sink.addr(), &[("limits.max_message_size", "2048")])`.
pub fn config(backend: SocketAddr, extra: &[(&str, &str)]) -> String {
    extra
        .iter()
        .fold(Config::new(&[backend]), |c, (k, v)| c.set(k, v))
        .yaml()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_nested_keys_and_listeners() {
        let yaml = Config::new(&["127.0.0.1:25".parse().unwrap()])
            .set("limits.max_message_size", "2048")
            .listener("tls", &[("tls", "implicit")])
            .yaml();
        assert!(
            yaml.starts_with(
                "listeners:\n  - name: smtp\n    address: 127.0.0.1:0\n  - name: tls\n"
            ),
            "{yaml}"
        );
        assert!(
            yaml.contains("    address: 127.0.0.1:0\n    tls: implicit\n"),
            "{yaml}"
        );
        assert!(
            yaml.contains(
                "backend:\n  servers: [\"127.0.0.1:25\"]\n  timeouts:\n    connect: 5s\n"
            ),
            "{yaml}"
        );
        assert!(
            yaml.contains("limits:\n  max_message_size: 2048\n"),
            "{yaml}"
        );
    }
}
