//! The `edge-gateway` binary: command line, tracing, signals. Everything
//! else lives in the library: `edge_gateway::pipeline` runs the service.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge_gateway::config::Config;
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc's malloc: the batch buffers (megabytes, one
/// per batch, freed on the writer's thread) made glibc hand pages back to
/// the kernel and fault them in again, zeroed, for the next batch.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// IoT edge ingestion gateway: MQTT to time-partitioned PostgreSQL.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Log format on stderr: "text" (for people) or "json" (one object per
    /// line, for log shippers). RUST_LOG sets the levels.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway service.
    Run {
        #[arg(long, default_value = "config/gateway.toml")]
        config: PathBuf,
    },
    /// Everything local: embedded broker, throwaway PostgreSQL, simulated devices.
    Demo {
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Samples per second per device.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Samples per message.
        #[arg(long, default_value_t = 10)]
        pack: usize,
        /// Show the live view (`top`) of the demo's gateway instead of the
        /// status line.
        #[arg(long)]
        top: bool,
    },
    /// Create the schema and partitions, then exit.
    Migrate {
        #[arg(long, default_value = "config/gateway.toml")]
        config: PathBuf,
    },
    /// A live view of a running gateway, from its HTTP endpoints (q quits).
    Top {
        /// The gateway's HTTP address (`http.addr`).
        #[arg(long, default_value = "http://127.0.0.1:9187")]
        url: String,
        /// One line a second instead of the full screen (the default when
        /// stdout is not a terminal).
        #[arg(long)]
        plain: bool,
        /// Stop after this many seconds (default: until q or interrupted).
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Run the detector offline over timestamp,value rows; write
    /// timestamp,value,anomaly_score per row.
    Replay {
        /// Optional: the detector settings come from its [anomaly] table.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
    },
    /// Validate the configuration and print the effective one (secrets masked).
    CheckConfig {
        #[arg(long, default_value = "config/gateway.toml")]
        config: PathBuf,
    },
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=off,rumqttc=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A token cancelled on the first SIGINT or SIGTERM.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = tokio::signal::ctrl_c().await;
                    t.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        t.cancel();
    });
    token
}

/// On SIGHUP, re-reads the config file and hands its rules to the workers;
/// a file that does not validate is refused and the running rules stay.
async fn reload_rules_on_sighup(
    path: PathBuf,
    rules: tokio::sync::watch::Sender<
        std::sync::Arc<Vec<edge_gateway::analytics::rules::RuleConfig>>,
    >,
) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; rules will not reload");
            return;
        }
    };
    while hup.recv().await.is_some() {
        match Config::load(Some(&path)) {
            Ok(config) => {
                let count = config.rules.len();
                let _ = rules.send(std::sync::Arc::new(config.rules));
                tracing::info!(
                    rules = count,
                    "SIGHUP: rules reloaded (other settings apply at the next start)"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: config refused; keeping the running rules")
            }
        }
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(Some(path)).with_context(|| format!("invalid configuration ({})", path.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    match cli.command {
        Command::Run { config: path } => {
            let config = load(&path)?;
            let (rules_tx, rules_rx) =
                tokio::sync::watch::channel(std::sync::Arc::new(config.rules.clone()));
            tokio::spawn(reload_rules_on_sighup(path, rules_tx));
            edge_gateway::pipeline::run_with_rules(config, shutdown_on_signals(), rules_rx).await?;
        }
        Command::Demo {
            seconds,
            devices,
            rate,
            pack,
            top,
        } => {
            let options = edge_gateway::demo::DemoOptions {
                seconds,
                devices,
                rate,
                pack,
                top,
            };
            edge_gateway::demo::run(options, shutdown_on_signals()).await?;
        }
        Command::Migrate { config } => {
            let config = load(&config)?;
            let partitions = edge_gateway::sink::partitions::Partitions::new(
                &config.database.schema,
                config.database.partition,
            );
            edge_gateway::pipeline::migrate(&config, &partitions).await?;
            println!("schema {} is up to date", config.database.schema);
        }
        Command::Top {
            url,
            plain,
            seconds,
        } => {
            tokio::task::block_in_place(|| edge_gateway::top::run(&url, plain, seconds))?;
        }
        Command::Replay {
            config,
            input,
            output,
        } => {
            let config = match config {
                Some(path) => load(&path)?,
                None => Config::default(),
            };
            let stats = edge_gateway::backtest::run(&config, &input, &output)?;
            eprintln!(
                "replay: {} rows, highest score {:.3}",
                stats.rows, stats.max_score
            );
        }
        Command::CheckConfig { config } => {
            let config = load(&config)?;
            print!("{}", config.to_redacted_toml());
        }
    }
    Ok(())
}
