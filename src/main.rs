//! The `scopegate` binary: parse the command line, set up logging, load and validate the
//! config, bind, and hand over to [`scopegate::run`]. No request handling lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use scopegate::config::{self, ConfigSource};
use scopegate::{Listeners, Reloader};
use std::sync::Arc;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "scopegate",
    version,
    about = "A scoping gateway between AI-agent sandboxes and the Relace API",
    long_about = "Refuses every request a repo token may not make, locally, and streams every permitted \
                  request to the Relace API.\n\nConfig: --config PATH, else $SCOPEGATE_CONFIG, else \
                  config/scopegate.toml, else built-in defaults; SCOPEGATE_<SECTION>__<KEY> overrides any key."
)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the config, print it with secrets redacted, and exit (2 on errors).
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let loaded = config::load(cli.config.as_deref());
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => match loaded {
            Ok((_, raw, source)) => {
                println!("# config: {}", describe(&source));
                print!("{}", config::render_redacted(&raw));
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("scopegate: the config has {} problem(s):", errors.0.len());
                for problem in &errors.0 {
                    eprintln!("  - {problem}");
                }
                ExitCode::from(2)
            }
        },
        Command::Run => {
            let (config, _, source) = match loaded {
                Ok(loaded) => loaded,
                Err(errors) => {
                    for problem in &errors.0 {
                        tracing::error!(problem = problem.as_str(), "invalid configuration");
                    }
                    eprintln!(
                        "scopegate: not starting: the config has {} problem(s):",
                        errors.0.len()
                    );
                    for problem in &errors.0 {
                        eprintln!("  - {problem}");
                    }
                    return ExitCode::from(2);
                }
            };
            tracing::info!(config = %describe(&source), version = env!("CARGO_PKG_VERSION"), "starting");
            // One TLS implementation for every client in the process (the upstream, Redis):
            // ring, whatever else a dependency's features could bring in.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(error) => {
                    eprintln!("scopegate: cannot start the runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let reload_path = match &source {
                ConfigSource::File(path) => Some(path.clone()),
                ConfigSource::Defaults => None,
            };
            let result = runtime.block_on(async move {
                // Signal handlers first: from here on SIGTERM drains and SIGHUP reloads.
                let shutdown = shutdown_signal();
                let reloads = reload_signals();
                let listeners = Listeners::bind(&config).await?;
                let reloader = Reloader {
                    requests: reloads,
                    load: Arc::new(move || config::load(reload_path.as_deref()).map(|(c, _, _)| c)),
                };
                scopegate::run_with_reload(config, listeners, shutdown, Some(reloader)).await
            });
            match result {
                Ok(()) => {
                    tracing::info!("stopped");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    tracing::error!(error = format!("{error:#}"), "fatal");
                    eprintln!("scopegate: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn describe(source: &ConfigSource) -> String {
    match source {
        ConfigSource::File(path) => path.display().to_string(),
        ConfigSource::Defaults => "built-in defaults".into(),
    }
}

/// Text logs by default, JSON when `SCOPEGATE_LOG_FORMAT=json`; level from `RUST_LOG`.
fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("SCOPEGATE_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
}

/// One item per SIGHUP (reload the config and TLS files). The handler is installed
/// before this returns, so a SIGHUP right after start-up is never the default (fatal) one.
fn reload_signals() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!(signal = "SIGHUP", "reloading the config");
                        // A reload already queued covers this one too.
                        let _ = tx.try_send(());
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP; config reload is unavailable")
            }
        }
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is called (not
/// when first polled), so a signal that arrives during start-up still drains cleanly.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let handlers = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        async move {
            match handlers {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
                        _ = int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
