//! Reloading on SIGHUP: the new configuration is parsed and validated in
//! full before anything is swapped in; a broken file changes nothing.

use std::path::Path;
use std::sync::Arc;

use crate::config::Config;
use crate::server::Shared;
use policy::relay::RelayPolicy;

/// Re-reads the policy from the configuration file and swaps it in
/// atomically. Transactions in flight keep the policy they started with.
pub fn reload(shared: &Shared, path: Option<&Path>) {
    for store in shared.listener_certs() {
        if let Err(e) = store.reload_if_changed() {
            tracing::error!(error = %e, "TLS certificate reload refused; the previous certificate stays in use");
        }
    }
    if let Some(auth) = &shared.auth {
        match auth.reload_users(true) {
            Ok(_) => tracing::info!("users file reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "users file reload refused; the previous accounts stay")
            }
        }
    }
    let Some(path) = path else {
        tracing::info!("SIGHUP: embedded configuration, nothing to reload");
        return;
    };
    let policy = Config::load(path)
        .map_err(|e| e.to_string())
        .and_then(|c| RelayPolicy::new(&c.policy.local_domains).map_err(|e| e.to_string()));
    match policy {
        Ok(p) => {
            shared.policy.store(Arc::new(p));
            tracing::info!(config = %path.display(), "policy reloaded");
        }
        Err(e) => tracing::error!(error = %e, "reload refused; the running policy stays in force"),
    }
}
