//! A throwaway Citus cluster for tests and benches: a coordinator and N
//! workers, each a [`LocalPostgres`] started with `citus` preloaded, joined
//! with `citus_add_node`. The coordinator is registered too, so tables that
//! stay on it can join distributed transactions.
//!
//! Citus is not packaged for this machine image: `bash ../shared/citus/build.sh`
//! (root, about 6 minutes) builds and installs it; without it, starting
//! fails with a message saying so.

use std::process::Command;

use super::postgres::LocalPostgres;
use super::{run, LocalError};

/// Settings every node runs with: Citus preloaded, prepared transactions
/// for two-phase commit across nodes, plain connections between nodes
/// (loopback only).
const NODE_SETTINGS: [&str; 3] = [
    "shared_preload_libraries=citus",
    "max_prepared_transactions=200",
    "citus.node_conninfo=sslmode=disable",
];

/// A running coordinator with its workers.
#[derive(Debug)]
pub struct LocalCitus {
    pub coordinator: LocalPostgres,
    pub workers: Vec<LocalPostgres>,
}

impl LocalCitus {
    /// Starts a coordinator and `workers` workers, with `settings` on every
    /// node (over the throwaway ones), and joins them.
    ///
    /// # Errors
    /// [`LocalError::Missing`] when Citus is not installed; the errors of
    /// [`LocalPostgres::start_with`]; a failed set-up statement.
    pub fn start(workers: usize, settings: &[&str]) -> Result<LocalCitus, LocalError> {
        if !citus_installed() {
            return Err(LocalError::Missing {
                what: "the Citus extension (citus.so)".into(),
                hint: "build and install it with `bash ../shared/citus/build.sh` (root, about 6 minutes)"
                    .into(),
            });
        }
        let all: Vec<&str> = NODE_SETTINGS.iter().chain(settings).copied().collect();
        let coordinator = LocalPostgres::start_with(&all)?;
        let workers = (0..workers)
            .map(|_| LocalPostgres::start_with(&all))
            .collect::<Result<Vec<_>, _>>()?;
        for node in std::iter::once(&coordinator).chain(&workers) {
            psql(node, "CREATE EXTENSION IF NOT EXISTS citus")?;
        }
        psql(
            &coordinator,
            &format!(
                "SELECT citus_set_coordinator_host('127.0.0.1', {})",
                coordinator.port()
            ),
        )?;
        for w in &workers {
            psql(
                &coordinator,
                &format!("SELECT citus_add_node('127.0.0.1', {})", w.port()),
            )?;
        }
        Ok(LocalCitus {
            coordinator,
            workers,
        })
    }

    /// The coordinator's URL: where the gateway and clients connect.
    pub fn url(&self) -> String {
        self.coordinator.url()
    }
}

/// True when this machine's PostgreSQL has Citus installed.
pub fn citus_installed() -> bool {
    let pg_config = std::path::Path::new("/usr/lib/postgresql/15/bin/pg_config");
    let libdir = Command::new(pg_config)
        .arg("--pkglibdir")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "/usr/lib/postgresql/15/lib".into());
    std::path::Path::new(&libdir).join("citus.so").is_file()
}

/// Runs one statement on `node` with `psql`, as superuser.
fn psql(node: &LocalPostgres, sql: &str) -> Result<String, LocalError> {
    let psql = node.bin().join("psql");
    let mut cmd = Command::new(psql);
    cmd.args([
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
        "-p",
        &node.port().to_string(),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-c",
        sql,
    ]);
    run(cmd, &format!("psql: {sql}"))
}
