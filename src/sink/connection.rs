//! The database connection: settings to a driver config (TLS verified when
//! a CA is given), connecting, and telling the driver's errors apart by
//! SQLSTATE, which decides between retrying a batch and isolating its poison.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use super::settings::DatabaseConfig;
use crate::settings::Invalid;

/// Where the database is and how to talk to it (TLS or not).
#[derive(Clone)]
pub struct Db {
    pub pg: tokio_postgres::Config,
    /// TLS with verified certificates, when `database.ca_file` is set.
    pub tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// `database.flush_after_kb`, set on every session once connected (0:
    /// the server's setting). A `SET`, not a startup option: poolers such
    /// as PgBouncer refuse startup options they do not know.
    pub flush_after_kb: u32,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Db {
    /// Connection settings and, when `database.ca_file` is set, TLS.
    ///
    /// # Errors
    /// [`Invalid`] for `database.url` or `database.ca_file`.
    pub fn new(settings: &DatabaseConfig) -> Result<Db, Invalid> {
        let mut pg = pg_config(&settings.url)?;
        let tls = if settings.ca_file.is_empty() {
            None
        } else {
            // With a CA the connection is verify-full: TLS is required, and
            // rustls checks the chain and the host name. A URL that would
            // let a man in the middle downgrade it is refused.
            let url = settings.url.to_ascii_lowercase().replace(' ', "");
            if ["sslmode=prefer", "sslmode=disable", "sslmode=allow"]
                .iter()
                .any(|m| url.contains(m))
            {
                return Err(Invalid::new(
                    "database.url",
                    "with database.ca_file set, sslmode must be require (or left out): prefer, allow and disable let a man in the middle force plaintext",
                ));
            }
            pg.ssl_mode(tokio_postgres::config::SslMode::Require);
            let config = crate::tls::client_config(&settings.ca_file, "", "")
                .map_err(|e| Invalid::new("database.ca_file", e.to_string()))?;
            Some(tokio_postgres_rustls::MakeRustlsConnect::new(config))
        };
        Ok(Db {
            pg,
            tls,
            flush_after_kb: settings.flush_after_kb,
        })
    }
}

impl From<tokio_postgres::Config> for Db {
    fn from(pg: tokio_postgres::Config) -> Db {
        Db {
            pg,
            tls: None,
            flush_after_kb: 0,
        }
    }
}

/// Opens a connection, drives it in a background task, and sets the
/// session's `backend_flush_after` ([`Db::flush_after_kb`]).
///
/// # Errors
/// When the database cannot be reached or refuses the login or the setting.
pub async fn connect(db: &Db) -> Result<Client, tokio_postgres::Error> {
    fn drive<F>(connection: F)
    where
        F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
    {
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "database connection ended");
            }
        });
    }
    let client = match &db.tls {
        Some(tls) => {
            let (client, connection) = db.pg.connect(tls.clone()).await?;
            drive(connection);
            client
        }
        None => {
            let (client, connection) = db.pg.connect(NoTls).await?;
            drive(connection);
            client
        }
    };
    if db.flush_after_kb > 0 {
        client
            .batch_execute(&format!(
                "SET backend_flush_after = '{}kB'",
                db.flush_after_kb
            ))
            .await?;
    }
    Ok(client)
}

/// The server's own words for a database error (SQLSTATE, message,
/// detail), where `Display` of the error would only say "db error".
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} {}", db.code().code(), db.message());
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text
        }
        None => e.to_string(),
    }
}

/// True for "no partition of relation ... found for row" (SQLSTATE 23514,
/// shared with CHECK violations): transient, the partition gets created.
pub fn is_missing_partition(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        db.code() == &SqlState::CHECK_VIOLATION
            && db.message().starts_with("no partition of relation")
    })
}

/// True for failures of the connection or of the server's availability,
/// which retrying the same rows later can fix: no SQLSTATE at all (I/O, a
/// closed connection), connection exceptions (08), insufficient resources
/// (53), operator intervention (57P: shutdown, crash recovery), a cancelled
/// statement (57014: `statement_timeout`), serialization failures and
/// deadlocks (40001, 40P01), a lock timeout (55P03), system errors (58), a
/// read-only transaction (25006: a demoted primary) and a missing partition.
/// Everything else is the data's fault: retrying it would fail forever.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code() else { return true };
    let code = code.code();
    let class = &code[..2.min(code.len())];
    matches!(class, "08" | "53" | "58")
        || code.starts_with("57P")
        || matches!(code, "57014" | "40001" | "40P01" | "55P03" | "25006")
        || is_missing_partition(e)
}

/// True for errors the data causes (see [`is_transient`]).
pub fn is_permanent(e: &tokio_postgres::Error) -> bool {
    !is_transient(e)
}

/// The connection settings from `database.url`, with a 5 s connect
/// timeout unless the URL sets one (a host that drops packets must fail
/// fast, so batches go to the spool) and `application_name` edge-gateway.
///
/// # Errors
/// [`Invalid`] for `database.url`.
pub fn pg_config(url: &str) -> Result<tokio_postgres::Config, Invalid> {
    let mut pg: tokio_postgres::Config = url.parse().map_err(|e| {
        Invalid::new(
            "database.url",
            format!("not a valid connection string: {e}"),
        )
    })?;
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(5));
    }
    if pg.get_application_name().is_none() {
        pg.application_name("edge-gateway");
    }
    Ok(pg)
}

/// What `database.url` points at, as the driver parsed it: host(s), port(s),
/// database and user, nothing else. A connection string is never shown,
/// even masked (masking by hand misses passwords with `/`, `?`, spaces or
/// quotes). Unparseable URLs show as such, without their text.
pub fn describe_database(url: &str) -> String {
    let Ok(pg) = url.parse::<tokio_postgres::Config>() else {
        return "<database.url does not parse>".to_string();
    };
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = pg.get_ports().iter().map(u16::to_string).collect();
    format!(
        "host={} port={} dbname={} user={}",
        if hosts.is_empty() {
            "localhost".into()
        } else {
            hosts.join(",")
        },
        if ports.is_empty() {
            "5432".into()
        } else {
            ports.join(",")
        },
        pg.get_dbname().unwrap_or("(user name)"),
        pg.get_user().unwrap_or("(none)"),
    )
}
