//! The command line: parse flags, set up logging, run a subcommand.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Config;
use crate::demo;
use crate::server::Server;

#[derive(Debug, Parser)]
#[command(
    name = "relayguard",
    version,
    about = "SMTP relay gateway: verifies NTLM and relay permission in front of a legacy MTA"
)]
pub struct Cli {
    /// Log format: readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the gateway with a configuration file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file (and the files it names) and exit.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Relay policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCmd,
    },
    /// Print the NT hash of a password for the users file. The password is
    /// read without echo from the terminal, or as one line from stdin.
    HashPassword,
    /// Run a self-contained demo: embedded configuration, built-in capture backend.
    Demo {
        /// SMTP listener address.
        #[arg(long, default_value = "127.0.0.1:2525")]
        smtp: SocketAddr,
        /// Metrics listener address (served once metrics exist).
        #[arg(long, default_value = "127.0.0.1:9100")]
        metrics: SocketAddr,
        /// Print the embedded configuration and exit.
        #[arg(long)]
        print_config: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Show the decision for one envelope, the rule that matched and why
    /// each earlier rule did not. Exit status 0 = allowed, 1 = denied.
    Explain(ExplainArgs),
}

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    #[arg(long, short)]
    config: PathBuf,
    /// Authenticated user (`alice`, `DOMAIN\alice`); omit for an
    /// unauthenticated client.
    #[arg(long)]
    user: Option<String>,
    /// Client address.
    #[arg(long)]
    client: std::net::IpAddr,
    #[arg(long)]
    from: String,
    #[arg(long)]
    to: String,
    /// Listener name (default: the first listener).
    #[arg(long)]
    listener: Option<String>,
    /// Authentication mechanism (ntlm, plain, login).
    #[arg(long, default_value = "ntlm")]
    mechanism: String,
    /// The session is over TLS.
    #[arg(long)]
    tls: bool,
    /// The message size declared with `SIZE=` at MAIL FROM, in bytes.
    #[arg(long)]
    size: Option<u64>,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RELAYGUARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // Client connections are served by the shards' own runtimes (see
    // `shards`); this one runs start-up, signals, reloads and HTTP.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relayguard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Cmd::Run { config } => run(&config).await,
            Cmd::Check { config } => check(&config),
            Cmd::HashPassword => hash_password(),
            Cmd::Policy {
                command: PolicyCmd::Explain(args),
            } => {
                let allowed = explain(args).await?;
                if !allowed {
                    std::process::exit(1);
                }
                Ok(())
            }
            Cmd::Demo {
                smtp,
                metrics,
                print_config,
            } => {
                if print_config {
                    print!(
                        "{}\n# ---- demo-users.yaml ----\n{}\n# ---- demo-policy.yaml ----\n{}",
                        demo::DEMO_CONFIG,
                        demo::DEMO_USERS,
                        policy::relay::DEMO_POLICY
                    );
                    return Ok(());
                }
                run_demo(smtp, metrics).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relayguard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn hash_password() -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal};
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Again: ")?;
        anyhow::ensure!(first == again, "the passwords differ");
        first
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    anyhow::ensure!(!password.is_empty(), "empty password");
    println!("{}", hex::encode(policy::identity::nt_hash(&password)));
    Ok(())
}

fn check(path: &Path) -> anyhow::Result<()> {
    let (config, policy) = Config::load(path)?;
    // Certificates and keys are part of the configuration: load them too.
    for l in &config.listeners {
        let pair = match (&l.certificate, &l.key, &config.tls) {
            (Some(c), Some(k), _) => Some((c, k)),
            (_, _, Some(t)) if l.tls != crate::config::TlsMode::None => {
                Some((&t.certificate, &t.key))
            }
            _ => None,
        };
        if let Some((c, k)) = pair {
            crate::tls::load_certified_key(c, k)
                .map_err(|e| anyhow::anyhow!("listener `{}`: {e}", l.name))?;
        }
    }
    if let Some(ca) = &config.backend.ca_file {
        crate::tls::backend_client_config(Some(ca))?;
    }
    let warnings = policy.warnings();
    for w in &warnings {
        println!("warning: {w}");
    }
    println!(
        "{}: configuration is valid{}",
        path.display(),
        if warnings.is_empty() {
            ""
        } else {
            " (with warnings)"
        }
    );
    Ok(())
}

/// `relayguard policy explain`: who the user is comes from the identity
/// source, exactly as at AUTH time.
async fn explain(args: ExplainArgs) -> anyhow::Result<bool> {
    let ExplainArgs {
        config: path,
        user,
        client,
        from,
        to,
        listener,
        mechanism,
        tls,
        size,
    } = args;
    let (config, policy) = Config::load(&path)?;
    let listener = listener.unwrap_or_else(|| config.listeners[0].name.clone());
    let mechanism = policy::relay::Mechanism::from_name(&mechanism)
        .ok_or_else(|| anyhow::anyhow!("unknown mechanism `{mechanism}`"))?;
    let principal = match user.as_deref() {
        None => None,
        Some(login) => Some(lookup_principal(&config, login, mechanism).await?),
    };
    let ctx = policy::relay::Context {
        principal: principal.as_ref(),
        client_ip: client,
        listener: &listener,
        tls,
        declared_size: size,
    };
    let explanation = policy.explain(&ctx, &from, &to);
    println!("{explanation}");
    Ok(explanation.is_allowed())
}

async fn lookup_principal(
    config: &Config,
    login: &str,
    mechanism: policy::relay::Mechanism,
) -> anyhow::Result<policy::relay::Principal> {
    let auth = config
        .auth
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("--user needs an `auth` section (no identity source)"))?;
    let (domain, user) = match login.split_once('\\') {
        Some((d, u)) => (d.to_string(), u.to_string()),
        None => (auth.ntlm.netbios_domain.clone(), login.to_string()),
    };
    if let Some(path) = &auth.users_file {
        use policy::identity::CredentialStore;
        let users = policy::identity::UsersFile::load(path)?;
        let a = users
            .lookup(&domain, &user)
            .ok_or_else(|| anyhow::anyhow!("no user `{domain}\\{user}` in {}", path.display()))?;
        return Ok(policy::relay::Principal {
            user: a.user,
            domain: a.domain,
            groups: a.groups,
            mechanism,
            addresses: a.mail,
        });
    }
    let ad = auth
        .active_directory
        .as_ref()
        .expect("validated: one source");
    let dir = crate::auth::ad::ActiveDirectory::new(ad)?;
    let e = dir.entry(&user).await?;
    Ok(policy::relay::Principal {
        user: e.account_name.clone(),
        domain,
        groups: e.groups.clone(),
        mechanism,
        addresses: e.addresses.clone(),
    })
}

async fn run(path: &Path) -> anyhow::Result<()> {
    let (config, policy) = Config::load(path)?;
    serve(config, Some(policy), Some(path.to_path_buf())).await
}

async fn run_demo(smtp: SocketAddr, metrics: SocketAddr) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let backend = demo::start_capture_backend().await?;
    let mut config = demo::demo_config(&demo::DemoOptions { smtp }, backend, dir.path())?;
    config.metrics = Some(crate::http::MetricsConfig {
        address: metrics,
        ..Default::default()
    });
    println!("RelayGuard demo: SMTP on {smtp} (STARTTLS with a self-signed certificate), local domain example.test");
    println!("capture backend on {backend}: one line per delivered message below");
    serve(config, None, None).await
}

/// `policy` is the one [`Config::load`] loaded, if it did; otherwise the
/// server loads it.
async fn serve(
    config: Config,
    policy: Option<policy::relay::Policy>,
    path: Option<PathBuf>,
) -> anyhow::Result<()> {
    let metrics_config = config.metrics.clone();
    let server = match policy {
        Some(policy) => Server::bind_with_policy(config, policy).await?,
        None => Server::bind(config).await?,
    };
    let metrics_listener = match &metrics_config {
        Some(m) => Some(crate::http::bind(m).await?),
        None => None,
    };
    for (name, addr) in server.local_addrs() {
        tracing::info!(listener = %name, address = %addr, "listening");
    }
    let shared = server.shared.clone();
    for w in shared.policy.load().warnings() {
        tracing::warn!(warning = %w, "policy warning");
    }
    crate::reload::spawn_policy_watcher(
        shared.clone(),
        path.clone(),
        std::time::Duration::from_secs(2),
    );
    // Metrics stay up while the SMTP side drains; /readyz says 503 then.
    let http_stop = tokio_util::sync::CancellationToken::new();
    if let (Some(m), Some(listener)) = (metrics_config, metrics_listener) {
        tokio::spawn(crate::http::serve(
            listener,
            shared.clone(),
            m,
            http_stop.clone(),
        ));
    }
    tokio::spawn(signals(shared.clone(), path));
    server.run().await;
    http_stop.cancel();
    let _ =
        tokio::task::spawn_blocking(move || shared.audit.flush(std::time::Duration::from_secs(2)))
            .await;
    Ok(())
}

/// SIGTERM/SIGINT start a graceful shutdown; SIGHUP reloads what can be
/// reloaded without dropping connections.
async fn signals(shared: std::sync::Arc<crate::server::Shared>, path: Option<PathBuf>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM received"); shared.shutdown.cancel(); }
            _ = int.recv() => { tracing::info!("SIGINT received"); shared.shutdown.cancel(); }
            _ = hup.recv() => crate::reload::reload(&shared, path.as_deref()),
        }
    }
}
