//! A real mosquitto broker for interoperability tests, configured from the
//! shipped `deploy/mosquitto.conf` so the tests prove the file we give
//! operators works. Only the listener, persistence location, logging and
//! user lines are replaced with the test's own.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{find_binary, free_port, io_err, running_as_root, tail, wait_for_port, LocalError};

/// The shipped broker configuration, compiled in so it is found from anywhere.
pub const SHIPPED_CONF: &str = include_str!("../../deploy/mosquitto.conf");

const OVERRIDDEN: [&str; 9] = [
    "listener",
    // The throwaway broker listens on loopback only and has no user
    // database: tests that need authentication give their own.
    "allow_anonymous",
    "password_file",
    "acl_file",
    "persistence_location",
    "log_dest",
    "user",
    "pid_file",
    "port",
];

/// A running mosquitto with its own temp dir and port.
#[derive(Debug)]
pub struct Mosquitto {
    dir: tempfile::TempDir,
    exe: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts mosquitto on a free port with the shipped configuration.
    ///
    /// # Errors
    /// [`LocalError::Missing`] when mosquitto is not installed.
    pub fn start() -> Result<Mosquitto, LocalError> {
        Mosquitto::start_with(&[])
    }

    /// Starts mosquitto with the shipped configuration, where `overrides`
    /// (whole `key value` lines) replace the shipped lines of the same keys.
    ///
    /// # Errors
    /// As for [`start`](Self::start).
    pub fn start_with(overrides: &[&str]) -> Result<Mosquitto, LocalError> {
        let exe = find_binary("mosquitto", &["/usr/sbin", "/usr/local/sbin"]).ok_or_else(|| {
            LocalError::Missing {
                what: "mosquitto".into(),
                hint: "install it (Debian: apt-get install mosquitto mosquitto-clients)".into(),
            }
        })?;
        let dir = tempfile::Builder::new()
            .prefix("edge-mosquitto-")
            .tempdir_in("/tmp")
            .map_err(io_err("create a temp dir for mosquitto"))?;
        let mut broker = Mosquitto {
            dir,
            exe,
            port: free_port()?,
            child: None,
        };
        broker.write_conf(overrides)?;
        broker.launch()?;
        Ok(broker)
    }

    fn conf_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }

    fn write_conf(&self, overrides: &[&str]) -> Result<(), LocalError> {
        let key_of = |line: &str| line.split_whitespace().next().unwrap_or("").to_string();
        let replaced: Vec<String> = overrides.iter().map(|l| key_of(l)).collect();
        let mut conf: String = SHIPPED_CONF
            .lines()
            .filter(|line| {
                let key = key_of(line);
                !OVERRIDDEN.contains(&key.as_str()) && !replaced.contains(&key)
            })
            .map(|line| format!("{line}\n"))
            .collect();
        conf.push_str(&format!(
            "\n# test overrides\nlistener {} 127.0.0.1\npersistence_location {}/\nlog_dest file {}\n",
            self.port,
            self.dir.path().display(),
            self.log_path().display()
        ));
        if !replaced.iter().any(|k| k == "allow_anonymous") {
            conf.push_str("allow_anonymous true\n");
        }
        for line in overrides {
            conf.push_str(line);
            conf.push('\n');
        }
        if running_as_root() {
            // Keep root so the broker can write into this root-owned temp dir.
            conf.push_str("user root\n");
        }
        std::fs::write(self.conf_path(), conf).map_err(io_err("write mosquitto.conf"))
    }

    fn launch(&mut self) -> Result<(), LocalError> {
        let out = File::create(self.dir.path().join("stdout.log"))
            .map_err(io_err("create mosquitto stdout log"))?;
        let child = Command::new(&self.exe)
            .arg("-c")
            .arg(self.conf_path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(io_err("mosquitto log"))?)
            .stderr(out)
            .spawn()
            .map_err(io_err("spawn mosquitto"))?;
        self.child = Some(child);
        if !wait_for_port(self.port, Duration::from_secs(10)) {
            return Err(LocalError::NotReady {
                what: "mosquitto".into(),
                secs: 10,
                log: tail(&self.log_path(), 20) + &tail(&self.dir.path().join("stdout.log"), 20),
            });
        }
        Ok(())
    }

    /// The broker port on 127.0.0.1.
    /// The broker's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Stops the broker (SIGTERM: it saves its persistence file).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            for _ in 0..100 {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts the broker on the same port with the same persistence.
    ///
    /// # Errors
    /// As for [`start`](Self::start).
    pub fn restart(&mut self) -> Result<(), LocalError> {
        self.stop();
        self.launch()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}
