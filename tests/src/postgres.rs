//! A private PostgreSQL for a test: a new cluster in a temporary
//! directory (`initdb`), listening only on a unix socket in that directory,
//! stopped and removed when dropped, also when the test fails.
//!
//! PostgreSQL refuses to run as root; as root, its programs run as the
//! `postgres` user (made by Debian's package) through `runuser`. The
//! binaries come from Debian's `postgresql` package
//! (`/usr/lib/postgresql/<version>/bin`), which `tests/run.sh` installs.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The test-wide backend choice: `OUTPOST_TEST_STORE=postgres` runs the
/// hubs of the integration tests on PostgreSQL, anything else on sled.
pub fn selected() -> bool {
    std::env::var("OUTPOST_TEST_STORE").is_ok_and(|v| v == "postgres")
}

/// The directory of PostgreSQL's programs.
pub fn bindir() -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (apt-get install postgresql; tests/run.sh does it)")?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().context("no PostgreSQL version with initdb under /usr/lib/postgresql")
}

/// A running private cluster.
#[derive(Debug)]
pub struct Postgres {
    dir: Option<tempfile::TempDir>,
    bin: PathBuf,
    port: u16,
    running: bool,
}

impl Postgres {
    /// Makes and starts a cluster. `fast` turns fsync off (tests that do not
    /// measure; a stopped server loses nothing committed, only a machine
    /// crash would); benchmarks keep the defaults. Commits stay synchronous:
    /// the hub acknowledges what a commit returned.
    pub fn start(fast: bool) -> Result<Self> {
        let bin = bindir()?;
        let dir = tempfile::Builder::new().prefix("outpost-pg-").tempdir()?;
        if crate::is_root() {
            let status = Command::new("chown").arg("postgres:postgres").arg(dir.path()).status()?;
            if !status.success() {
                bail!("chown postgres {} failed (is there a postgres user?)", dir.path().display());
            }
        }
        let port = crate::free_port()?;
        let mut pg = Postgres { dir: Some(dir), bin, port, running: false };
        let data = pg.data();
        pg.pg_cmd("initdb", |c| {
            c.arg("-D").arg(&data).args([
                "-U",
                "outpost",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ])
        })?;
        let mut settings = format!(
            "listen_addresses = ''\nunix_socket_directories = '{}'\nport = {port}\nmax_connections = 200\n",
            pg.socket_dir().display()
        );
        if fast {
            settings.push_str("fsync = off\nfull_page_writes = off\n");
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
        text.push_str(&settings);
        std::fs::write(&conf, text)?;
        pg.start_again()?;
        Ok(pg)
    }

    fn root(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new("/nonexistent"), |d| d.path())
    }

    fn data(&self) -> PathBuf {
        self.root().join("data")
    }

    /// Where the server's socket is.
    pub fn socket_dir(&self) -> PathBuf {
        self.root().to_owned()
    }

    /// The server's log.
    pub fn log(&self) -> PathBuf {
        self.root().join("postgres.log")
    }

    fn pg_cmd(&self, program: &str, args: impl FnOnce(&mut Command) -> &mut Command) -> Result<String> {
        let mut cmd = if crate::is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(program));
            c
        } else {
            Command::new(self.bin.join(program))
        };
        args(&mut cmd);
        cmd.current_dir(self.root());
        let out = cmd.stdin(std::process::Stdio::null()).output().with_context(|| format!("run {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.log()).unwrap_or_default()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts the server (again), waiting until it accepts connections.
    pub fn start_again(&mut self) -> Result<()> {
        let (data, log) = (self.data(), self.log());
        self.pg_cmd("pg_ctl", |c| c.arg("-D").arg(&data).arg("-l").arg(&log).args(["-w", "-t", "30", "start"]))?;
        self.running = true;
        Ok(())
    }

    /// Stops the server at once (as a crash or a pulled cable would look to
    /// its clients).
    pub fn stop(&mut self) -> Result<()> {
        let data = self.data();
        self.pg_cmd("pg_ctl", |c| c.arg("-D").arg(&data).args(["-w", "-m", "immediate", "stop"]))?;
        self.running = false;
        Ok(())
    }

    /// Serves TLS on 127.0.0.1 as well, with a certificate for
    /// `localhost` and `127.0.0.1` from `ca`, and refuses plain TCP
    /// (`hostnossl ... reject`); restarts the server.
    pub fn serve_tls(&mut self, ca: &crate::TestCa) -> Result<()> {
        let data = self.data();
        let (cert, key) = (data.join("server.crt"), data.join("server.key"));
        ca.leaf(&["localhost", "127.0.0.1"], &cert, &key)?;
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        if crate::is_root() {
            let status = Command::new("chown").arg("postgres:postgres").arg(&cert).arg(&key).status()?;
            if !status.success() {
                bail!("chown postgres {}", key.display());
            }
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str(
            "listen_addresses = '127.0.0.1'\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
        );
        std::fs::write(&conf, text)?;
        let hba = data.join("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba)?;
        std::fs::write(&hba, format!("hostnossl all all all reject\nhostssl all all 127.0.0.1/32 trust\n{rules}"))?;
        self.stop()?;
        self.start_again()
    }

    /// A connection string for database `db` over TCP on 127.0.0.1 (see
    /// [`Postgres::serve_tls`]).
    pub fn tcp_url(&self, db: &str) -> String {
        format!("host=127.0.0.1 port={} user=outpost dbname={db}", self.port)
    }

    /// A connection string for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("host={} port={} user=outpost dbname={db}", self.socket_dir().display(), self.port)
    }

    /// `pg_dump -Fc` of database `db` into `file` (the operator's backup,
    /// docs/OPERATIONS.md).
    pub fn dump(&self, db: &str, file: &Path) -> Result<()> {
        let (dir, port) = (self.socket_dir(), self.port.to_string());
        let out = self.root().join("dump.tmp");
        self.pg_cmd("pg_dump", |c| {
            c.arg("-h").arg(&dir).args(["-p", &port, "-U", "outpost", "-Fc", "-f"]).arg(&out).arg(db)
        })?;
        std::fs::copy(&out, file)?;
        Ok(())
    }

    /// Drops database `db` (its content lost, as on a lost machine).
    pub fn drop_db(&self, db: &str) -> Result<()> {
        let (dir, port) = (self.socket_dir(), self.port.to_string());
        self.pg_cmd("dropdb", |c| c.arg("-h").arg(&dir).args(["-p", &port, "-U", "outpost", "--if-exists", db]))?;
        Ok(())
    }

    /// Restores `file` (from [`Postgres::dump`]) as database `db`, made
    /// anew: `createdb` then `pg_restore` (`--clean` into a database that
    /// exists fails on partitioned tables).
    pub fn restore(&self, db: &str, file: &Path) -> Result<()> {
        let (dir, port) = (self.socket_dir(), self.port.to_string());
        let local = self.root().join("restore.tmp");
        std::fs::copy(file, &local)?;
        if crate::is_root() {
            Command::new("chown").arg("postgres:postgres").arg(&local).status()?;
        }
        self.create_db(db)?;
        self.pg_cmd("pg_restore", |c| {
            c.arg("-h").arg(&dir).args(["-p", &port, "-U", "outpost", "-d", db]).arg(&local)
        })?;
        Ok(())
    }

    /// Creates database `name`; returns its connection string.
    pub fn create_db(&self, name: &str) -> Result<String> {
        let (dir, port) = (self.socket_dir(), self.port.to_string());
        self.pg_cmd("createdb", |c| c.arg("-h").arg(&dir).args(["-p", &port, "-U", "outpost", name]))?;
        Ok(self.url(name))
    }

    /// Runs SQL in database `db` with psql; returns its unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let (dir, port) = (self.socket_dir(), self.port.to_string());
        self.pg_cmd("psql", |c| {
            c.arg("-h").arg(&dir).args([
                "-p",
                &port,
                "-U",
                "outpost",
                "-d",
                db,
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
        })
    }

    /// The directory of PostgreSQL's programs (pgbench for benchmarks).
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The server's port (with [`Postgres::socket_dir`] as host).
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            if std::thread::panicking() {
                let text = std::fs::read_to_string(self.log()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                eprintln!("--- postgres.log (last {} lines)", tail.len());
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
            let _ = self.stop();
        }
        // The TempDir removes the cluster's files.
    }
}
