//! Services as real processes (the release or debug binaries), for fault tests
//! that SIGKILL them.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

/// `target/<profile>/` of this test binary.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/..")
        .to_path_buf()
}

/// The path of a service binary, (re)built once per test run so a stale binary
/// from an older build is never tested.
///
/// It builds with the feature resolution `cargo test --workspace` used
/// (`--workspace --tests`): with `-p click-service -p postback-service` cargo
/// resolves the dependencies' features differently and recompiled async-nats,
/// common and both services in the middle of the test run, on the 2 cores the
/// tests were using. This way it only links the binaries cargo test did not.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "--workspace", "--bins", "--tests"]);
        if !cfg!(debug_assertions) {
            build.arg("--release");
        }
        let status = build.status().expect("cargo build");
        assert!(status.success(), "building the service binaries");
    });
    bin_dir().join(name)
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every thread's stack of a live process that hangs, by gdb when it is there
/// (evidence for a hang that does not reproduce: a lock inside sled, a stuck
/// JetStream request); a note when it is not.
fn stacks(pid: u32) -> String {
    let out = Command::new("timeout")
        .args(["60", "gdb", "-p", &pid.to_string(), "-batch", "-nx"])
        .args(["-ex", "set pagination off", "-ex", "thread apply all bt 20"])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let frames: Vec<String> = text
                .lines()
                .filter(|l| l.starts_with("Thread ") || l.starts_with('#'))
                .map(|l| l.chars().take(200).collect::<String>())
                .collect();
            let dump: String = frames.join("\n").chars().take(60_000).collect();
            format!("thread stacks (gdb):\n{dump}")
        }
        Err(e) => format!("(no thread stacks: gdb did not run: {e})"),
    }
}

/// How long a service may take to answer `/readyz` with 200. Generous: on a
/// loaded 2-core machine a fresh JetStream server's stream creation and the
/// first fsyncs can take seconds; a service that exits fails at once instead.
pub const READY_WITHIN: Duration = Duration::from_secs(60);

/// One service process.
pub struct Process {
    name: &'static str,
    child: Option<Child>,
    pub addr: SocketAddr,
    env: Vec<(String, String)>,
    log: PathBuf,
}

impl Process {
    /// Starts `name` with these environment variables (plus LISTEN_ADDR).
    pub fn start(name: &'static str, env: Vec<(String, String)>, log_dir: &Path) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self::start_on(name, env, log_dir, addr)
    }

    /// Starts `name` listening on `addr`.
    pub fn start_on(
        name: &'static str,
        env: Vec<(String, String)>,
        log_dir: &Path,
        addr: SocketAddr,
    ) -> Self {
        let mut p = Self {
            name,
            child: None,
            addr,
            env,
            log: log_dir.join(format!("{name}-{}.log", addr.port())),
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(binary(self.name))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("LISTEN_ADDR", self.addr.to_string())
            .env("RUST_LOG", "info")
            // An error at start ends in its message, not 30 lines of backtrace
            // (the log's tail is what a failing test shows); panics keep theirs.
            .env("RUST_LIB_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("service binary runs");
        self.child = Some(child);
    }

    /// Waits until `/readyz` answers 200; panics with the log's tail if the
    /// process exits or is not ready within [`READY_WITHIN`].
    pub async fn ready(&mut self, http: &reqwest::Client) {
        let started = tokio::time::Instant::now();
        let mut last = String::from("(no answer)");
        let mut moved = false;
        while started.elapsed() < READY_WITHIN {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                // free_port() releases its port before the service binds it:
                // another process may take it in between. Then move, once.
                if !moved && self.log_text().contains("Address already in use") {
                    moved = true;
                    self.addr.set_port(free_port());
                    self.spawn();
                    continue;
                }
                self.fail(&format!("exited with {status} before it was ready"));
            }
            // Bounded: whatever else holds the port may accept and never answer.
            let url = format!("http://{}/readyz", self.addr);
            match http.get(&url).timeout(Duration::from_secs(2)).send().await {
                Ok(r) if r.status() == reqwest::StatusCode::OK => return,
                Ok(r) => {
                    let status = r.status();
                    last = format!("{status}: {}", r.text().await.unwrap_or_default());
                }
                Err(e) => last = format!("(no answer: {e})"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let threads = self
            .child
            .as_ref()
            .map(|c| stacks(c.id()))
            .unwrap_or_default();
        self.fail(&format!(
            "not ready in {READY_WITHIN:?}; last /readyz: {last}\n{threads}"
        ));
    }

    /// What the process has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn fail(&self, what: &str) -> ! {
        let log = self.log_text();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        panic!(
            "{} on {}: {what}\nlog tail (newest first):\n{}",
            self.name,
            self.addr,
            tail.join("\n")
        );
    }

    /// SIGKILL: no drain, no flush.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and waits for the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().ok()
    }

    /// Starts it again on the same address with the same environment.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}
