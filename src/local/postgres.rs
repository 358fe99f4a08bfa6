//! A throwaway PostgreSQL cluster: `initdb` into a temp dir, a free port on
//! 127.0.0.1 and a unix socket in the same dir; stopped and removed on drop.
//!
//! `initdb` and `postgres` refuse to run as root, so when this process is
//! root both run as the `postgres` system user (`runuser -u postgres --`) in a
//! directory that user owns.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{find_binary, io_err, run, running_as_root, tail, wait_for_port, LocalError};

const INSTALL_HINT: &str =
    "install the PostgreSQL server (Debian: apt-get install postgresql-15), \
     or set PG_BIN to the directory holding initdb and postgres";

/// A running throwaway cluster.
#[derive(Debug)]
pub struct LocalPostgres {
    dir: Option<tempfile::TempDir>,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    child: Option<Child>,
    /// Extra `-c name=value` settings.
    settings: Vec<String>,
}

/// Where `initdb` and `postgres` live: `$PG_BIN`, then the newest
/// `/usr/lib/postgresql/*/bin`, then `PATH`.
fn bin_dir() -> Result<PathBuf, LocalError> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    find_binary("initdb", &[])
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .ok_or_else(|| LocalError::Missing {
            what: "PostgreSQL initdb".into(),
            hint: INSTALL_HINT.into(),
        })
}

fn postgres_ids() -> Result<(u32, u32), LocalError> {
    let id = |flag: &str| -> Result<u32, LocalError> {
        let mut cmd = Command::new("id");
        cmd.args([flag, "postgres"]);
        run(cmd, "look up the postgres user")
            .map_err(|_| LocalError::Missing {
                what: "system user 'postgres'".into(),
                hint: "running as root needs the postgres user to run initdb (it comes with the postgresql package)"
                    .into(),
            })?
            .trim()
            .parse()
            .map_err(|_| LocalError::Failed {
                what: "id postgres".into(),
                detail: "not a number".into(),
            })
    };
    Ok((id("-u")?, id("-g")?))
}

impl LocalPostgres {
    /// Creates and starts a cluster; returns once it accepts connections.
    ///
    /// The cluster is tuned for throwaway use (`fsync=off`): it is for demos
    /// and tests, never for data that matters.
    ///
    /// # Errors
    /// [`LocalError::Missing`] saying what to install when the binaries or the
    /// `postgres` user are missing; other variants when a step fails.
    pub fn start() -> Result<LocalPostgres, LocalError> {
        LocalPostgres::start_with(&[])
    }

    /// Like [`start`](Self::start), with `name=value` settings over the
    /// throwaway ones (benchmarks use `fsync=on` and friends, so the
    /// database writes like a production one).
    ///
    /// # Errors
    /// As for [`start`](Self::start).
    pub fn start_with(settings: &[&str]) -> Result<LocalPostgres, LocalError> {
        let bin = bin_dir()?;
        for tool in ["initdb", "postgres", "pg_ctl"] {
            if !bin.join(tool).is_file() {
                return Err(LocalError::Missing {
                    what: format!("PostgreSQL {tool} in {}", bin.display()),
                    hint: INSTALL_HINT.into(),
                });
            }
        }
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("edge-pg-")
            .tempdir_in("/tmp")
            .map_err(io_err("create a temp dir for PostgreSQL"))?;
        if as_postgres {
            let (uid, gid) = postgres_ids()?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(io_err("chown the PostgreSQL temp dir to postgres"))?;
        }
        let mut pg = LocalPostgres {
            dir: Some(dir),
            bin,
            port: 0,
            as_postgres,
            child: None,
            settings: settings.iter().map(|s| s.to_string()).collect(),
        };
        let data = pg.data_dir();
        let mut initdb = pg.command("initdb");
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(initdb, "initdb")?;
        pg.launch()?;
        Ok(pg)
    }

    /// Like [`start`](Self::start), serving TLS with the PEM certificate and
    /// key given (copied into the cluster's directory, key mode 0600).
    ///
    /// # Errors
    /// As for [`start`](Self::start), or when the files cannot be copied.
    pub fn start_tls(cert: &Path, key: &Path) -> Result<LocalPostgres, LocalError> {
        let mut pg = LocalPostgres::start()?;
        pg.stop();
        let (crt, k) = (pg.dir().join("server.crt"), pg.dir().join("server.key"));
        std::fs::copy(cert, &crt).map_err(io_err("copy the server certificate"))?;
        std::fs::copy(key, &k).map_err(io_err("copy the server key"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod the server key"))?;
        if pg.as_postgres {
            let (uid, gid) = postgres_ids()?;
            for f in [&crt, &k] {
                std::os::unix::fs::chown(f, Some(uid), Some(gid))
                    .map_err(io_err("chown the TLS files"))?;
            }
        }
        pg.settings.extend([
            "ssl=on".into(),
            format!("ssl_cert_file={}", crt.display()),
            format!("ssl_key_file={}", k.display()),
        ]);
        pg.launch()?;
        Ok(pg)
    }

    fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or(Path::new("/nonexistent"), |d| d.path())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir().join("postgres.log")
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(exe);
            cmd
        } else {
            Command::new(exe)
        }
    }

    /// Starts the server on a fresh free port (again, after [`stop`](Self::stop)
    /// it keeps its port so URLs stay valid).
    fn launch(&mut self) -> Result<(), LocalError> {
        if self.port == 0 {
            self.port = super::free_port()?;
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io_err("open the PostgreSQL log"))?;
        let log2 = log.try_clone().map_err(io_err("open the PostgreSQL log"))?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=100",
            ])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        self.child = Some(cmd.spawn().map_err(io_err("spawn postgres"))?);
        if !wait_for_port(self.port, Duration::from_secs(30)) {
            return Err(LocalError::NotReady {
                what: "postgres".into(),
                secs: 30,
                log: tail(&self.log_path(), 20),
            });
        }
        // The port opens just before recovery ends; wait for real readiness.
        for _ in 0..100 {
            let mut ready = Command::new(self.bin.join("pg_isready"));
            ready.args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()]);
            if ready.status().is_ok_and(|s| s.success()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(LocalError::NotReady {
            what: "postgres".into(),
            secs: 10,
            log: tail(&self.log_path(), 20),
        })
    }

    /// The directory of the PostgreSQL binaries in use (`psql` is there).
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The TCP port on 127.0.0.1.
    /// The process the cluster runs under (the postmaster, or `runuser`
    /// starting it as `postgres`): its tree holds every backend.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for the `postgres` database as superuser `postgres` over TCP.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast shutdown), keeping its data for [`restart`](Self::restart).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let mut ctl = self.command("pg_ctl");
            ctl.arg("-D")
                .arg(self.data_dir())
                .args(["stop", "-m", "fast", "-w", "-t", "30"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if !ctl.status().is_ok_and(|s| s.success()) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    /// Starts a stopped server again on the same port.
    ///
    /// # Errors
    /// As for [`start`](Self::start).
    pub fn restart(&mut self) -> Result<(), LocalError> {
        self.stop();
        self.launch()
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}
