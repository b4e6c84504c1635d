//! Services as real processes (the release or debug binaries), for fault tests
//! that SIGKILL them.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        OnceLock,
    },
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

/// What cargo sets for a test binary of its package besides `CARGO_PKG_*`
/// and `CARGO_BIN_EXE_*` (the cargo book's "Environment variables Cargo sets
/// for crates").
const PACKAGE_VARS: [&str; 5] = [
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
];

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
        // Without the variables cargo sets for this test binary's package:
        // build scripts that track them (ring's tracks CARGO_MANIFEST_DIR)
        // would see them change, so this build recompiled ring and all that
        // depends on it (25 s on 2 cores, in the middle of the test run),
        // and the next `cargo test` recompiled it all again without them.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_BIN_EXE_")
                || PACKAGE_VARS.contains(&key.as_ref())
            {
                build.env_remove(key.as_ref());
            }
        }
        if !cfg!(debug_assertions) {
            build.arg("--release");
        }
        let status = build.status().expect("cargo build");
        assert!(status.success(), "building the service binaries");
    });
    bin_dir().join(name)
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

/// Sends SIGSTOP to `pid` and returns once every one of its threads is
/// stopped. `kill` returns before that: the signal stops the other threads
/// only once one thread has run to take it, and on a loaded machine the
/// rest (a nats-server's socket reader, say) go on answering for a while,
/// so a request sent "after the pause" was answered.
pub fn stop(pid: u32) {
    let status = Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status();
    assert!(status.is_ok_and(|s| s.success()), "kill -STOP {pid}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !all_threads_stopped(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} not stopped within 10 s of SIGSTOP"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether every thread of `pid` is in state `T` (stopped), from
/// `/proc/<pid>/task/*/stat` (the state is the field after the name, which
/// ends at the last `)`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                .is_some_and(|state| state == 'T')
        })
    })
}

/// How long a service may take to answer `/readyz` with 200. Generous: on a
/// loaded 2-core machine a fresh JetStream server's stream creation and the
/// first fsyncs can take seconds; a service that exits fails at once instead.
pub const READY_WITHIN: Duration = Duration::from_secs(60);

/// One service process.
pub struct Process {
    name: &'static str,
    child: Option<Child>,
    /// What it is told to bind (LISTEN_ADDR), and where it serves HTTP once
    /// [`Process::ready`] has read the address it bound (port 0 until then),
    /// so a restart comes back where clients expect it.
    pub addr: SocketAddr,
    env: Vec<(String, String)>,
    log: PathBuf,
    /// Where it writes the address it bound (ADDR_FILE).
    addr_file: PathBuf,
    /// The log's length when this run of the process started.
    log_from: usize,
    /// Starts again (a restart on its old port found it taken for a moment).
    rebinds: u32,
}

impl Process {
    /// Starts `name` with these environment variables on a port the OS picks:
    /// LISTEN_ADDR has port 0 and the service writes the port it bound to
    /// ADDR_FILE, so no other process can take the port in between (as one
    /// could when the harness picked a free port and released it first).
    pub fn start(name: &'static str, env: Vec<(String, String)>, log_dir: &Path) -> Self {
        Self::start_on(name, env, log_dir, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts `name` listening on `addr`.
    pub fn start_on(
        name: &'static str,
        env: Vec<(String, String)>,
        log_dir: &Path,
        addr: SocketAddr,
    ) -> Self {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let mut p = Self {
            name,
            child: None,
            addr,
            env,
            log: log_dir.join(format!("{name}-{n}.log")),
            addr_file: log_dir.join(format!("{name}-{n}.addr")),
            log_from: 0,
            rebinds: 0,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        self.log_from = self.log_text().len();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let _ = std::fs::remove_file(&self.addr_file);
        let child = Command::new(binary(self.name))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("LISTEN_ADDR", self.addr.to_string())
            .env("ADDR_FILE", &self.addr_file)
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

    /// The address the process wrote to ADDR_FILE, once it has.
    fn bound(&self) -> Option<SocketAddr> {
        std::fs::read_to_string(&self.addr_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Waits until `/readyz` answers 200; panics with the log's tail if the
    /// process exits or is not ready within [`READY_WITHIN`].
    pub async fn ready(&mut self, http: &reqwest::Client) {
        let started = tokio::time::Instant::now();
        let mut last = String::from("(no address yet: ADDR_FILE not written)");
        while started.elapsed() < READY_WITHIN {
            if let Some(status) = self.exited() {
                // A restart on its old port can find it taken for a moment: a
                // client connecting to the port while nothing listened may
                // have been given that very port as its own (a TCP
                // self-connect) until it gave the attempt up.
                let run = self
                    .log_text()
                    .get(self.log_from..)
                    .unwrap_or_default()
                    .to_owned();
                if self.addr.port() != 0
                    && run.contains("Address already in use")
                    && self.rebinds < 50
                {
                    self.rebinds += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    self.spawn();
                    continue;
                }
                self.fail(&format!("exited with {status} before it was ready"));
            }
            let Some(addr) = self.bound() else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            self.addr = addr;
            // Bounded: a process that accepts and never answers must not hang us.
            let url = format!("http://{addr}/readyz");
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

    /// The exit status of a process that has exited (then it is gone).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
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
        self.signal("-TERM")?;
        self.child.take()?.wait().ok()
    }

    /// SIGSTOP: the process is frozen, as a stopped VM or a long pause
    /// freezes it, until [`Process::resume`]. It holds its sockets and locks
    /// meanwhile and runs nothing.
    pub fn pause(&self) {
        stop(self.child.as_ref().expect("running").id());
    }

    /// SIGCONT: a paused process runs again, its timers long overdue.
    pub fn resume(&self) {
        assert_eq!(self.signal("-CONT"), Some(true), "SIGCONT {}", self.name);
    }

    /// Sends `signal` (`kill`'s spelling) to the process: whether `kill`
    /// succeeded, `None` when it is not running.
    fn signal(&self, signal: &str) -> Option<bool> {
        let pid = self.child.as_ref()?.id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status();
        Some(status.is_ok_and(|s| s.success()))
    }

    /// Starts it again on the address it bound, with the same environment.
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
