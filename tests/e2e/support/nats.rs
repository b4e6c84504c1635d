//! A `nats-server -js` on a random loopback port, in its own temp dir, killed on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct NatsServer {
    child: Option<Child>,
    pub url: String,
    dir: tempfile::TempDir,
}

fn binary() -> PathBuf {
    [
        "/usr/sbin/nats-server",
        "/usr/local/bin/nats-server",
        "/usr/bin/nats-server",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .unwrap_or_else(|| PathBuf::from("nats-server"))
}

impl NatsServer {
    /// Starts a server on a random port.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = Self {
            child: None,
            url: String::new(),
            dir,
        };
        server.spawn("-1");
        server
    }

    fn spawn(&mut self, port: &str) {
        let dir = self.dir.path();
        for entry in std::fs::read_dir(dir).expect("read temp dir").flatten() {
            if entry.path().extension().is_some_and(|e| e == "ports") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let child = Command::new(binary())
            .args(["-a", "127.0.0.1", "-p", port, "-js"])
            .arg("-sd")
            .arg(dir.join("js"))
            .arg("--ports_file_dir")
            .arg(dir)
            .arg("-l")
            .arg(dir.join("server.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server on PATH (Debian package `nats-server`)");
        self.child = Some(child);
        self.url = wait_for_ports_file(dir, Duration::from_secs(10));
    }

    /// Kills the server (its data stays) to simulate an outage.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&mut self) {
        self.kill();
        let port = self
            .url
            .rsplit(':')
            .next()
            .expect("url has a port")
            .to_owned();
        self.spawn(&port);
    }
}

fn wait_for_ports_file(dir: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let ports = std::fs::read_dir(dir)
            .expect("read temp dir")
            .flatten()
            .find(|e| e.path().extension().is_some_and(|x| x == "ports"));
        if let Some(entry) = ports {
            if let Ok(text) = std::fs::read_to_string(entry.path()) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    if let Some(url) = v["nats"][0].as_str() {
                        return url.to_owned();
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
    panic!("nats-server did not start within {timeout:?}; log tail:\n{tail}");
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
