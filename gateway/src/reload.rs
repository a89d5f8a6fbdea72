//! Reloading on SIGHUP and when files change: the new policy (or users
//! file, or certificate) is parsed and validated in full before it is
//! swapped in atomically; a broken file changes nothing but a log line and
//! a metric. Transactions in flight keep the policy they started with.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::metrics::ReloadKind;
use crate::server::Shared;

/// Everything reloadable, as after SIGHUP.
pub fn reload(shared: &Shared, config_path: Option<&Path>) {
    for store in shared.listener_certs() {
        match store.reload_if_changed() {
            Ok(changed) => {
                if changed {
                    shared.metrics.reload(ReloadKind::Certificate, true);
                }
            }
            Err(e) => {
                shared.metrics.reload(ReloadKind::Certificate, false);
                tracing::error!(error = %e, "TLS certificate reload refused; the previous certificate stays in use");
            }
        }
    }
    if let Some(auth) = &shared.auth {
        match auth.reload_users(true) {
            Ok(true) => {
                shared.metrics.reload(ReloadKind::Users, true);
                tracing::info!("users file reloaded");
            }
            Ok(false) => {}
            Err(e) => {
                shared.metrics.reload(ReloadKind::Users, false);
                tracing::error!(error = %e, "users file reload refused; the previous accounts stay");
            }
        }
    }
    reload_policy(shared, config_path);
}

/// Re-reads the policy (from the configuration file when it is inline, or
/// when the configuration file is known, so that a `policy_file` change
/// of path is seen too) and swaps it in.
pub fn reload_policy(shared: &Shared, config_path: Option<&Path>) -> bool {
    let loaded = match config_path {
        // Loading the configuration loads its policy.
        Some(path) => Config::load(path)
            .map(|(_, policy)| policy)
            .map_err(|e| e.to_string()),
        None => crate::policy_source::load(&shared.config),
    };
    match loaded {
        Ok(policy) => {
            for w in policy.warnings() {
                tracing::warn!(warning = %w, "policy warning");
            }
            shared.policy.store(Arc::new(policy));
            shared.metrics.reload(ReloadKind::Policy, true);
            tracing::info!("policy reloaded");
            true
        }
        Err(e) => {
            shared.metrics.reload(ReloadKind::Policy, false);
            tracing::error!(error = %e, "policy reload refused; the running policy stays in force");
            false
        }
    }
}

/// Watches the policy's file (or the configuration file holding it) and
/// reloads when its modification time changes.
pub fn spawn_policy_watcher(shared: Arc<Shared>, config_path: Option<PathBuf>, every: Duration) {
    let Some(watched) = shared
        .config
        .policy_location
        .as_ref()
        .and_then(|l| l.watched(config_path.as_deref()))
    else {
        return;
    };
    tokio::spawn(async move {
        let mut last = crate::policy_source::mtime(&watched);
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            if shared.shutdown.is_cancelled() {
                return;
            }
            let now = crate::policy_source::mtime(&watched);
            if now != last {
                last = now;
                tracing::info!(file = %watched.display(), "policy file changed");
                reload_policy(&shared, config_path.as_deref());
            }
        }
    });
}
