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
        // A restart on the same port can find it taken for a moment: a client
        // reconnecting to a port with no listener may be given that very port
        // as its own (a TCP self-connect), until it gives the attempt up.
        for _ in 0..50 {
            let mut child = self.spawn_once(port);
            match wait_for_ports_file(self.dir.path(), &mut child, Duration::from_secs(10)) {
                Some(url) => {
                    (self.child, self.url) = (Some(child), url);
                    return;
                }
                None => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
        panic!("nats-server did not start; log tail:\n{tail}");
    }

    fn spawn_once(&self, port: &str) -> Child {
        let dir = self.dir.path();
        for entry in std::fs::read_dir(dir).expect("read temp dir").flatten() {
            if entry.path().extension().is_some_and(|e| e == "ports") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Command::new(binary())
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
            .expect("nats-server on PATH (Debian package `nats-server`)")
    }

    /// Kills the server (its data stays) to simulate an outage.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with no data: a server
    /// without a volume, or a new one.
    pub fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.dir.path().join("js"));
        let port = self.port();
        self.spawn(&port);
    }

    fn port(&self) -> String {
        self.url
            .rsplit(':')
            .next()
            .expect("url has a port")
            .to_owned()
    }

    /// SIGSTOP: the server holds its connections and answers nothing (what
    /// it is sent waits in its sockets) until [`NatsServer::resume`].
    pub fn pause(&self) {
        super::process::stop(self.child.as_ref().expect("nats-server running").id());
    }

    /// SIGCONT: it reads and stores what it was sent meanwhile.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("nats-server running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "kill {signal} nats-server"
        );
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port();
        self.spawn(&port);
    }
}

/// The server's URL once it listens; `None` if it exited first (its port
/// taken) or did not listen within `timeout`.
fn wait_for_ports_file(dir: &Path, child: &mut Child, timeout: Duration) -> Option<String> {
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
                        return Some(url.to_owned());
                    }
                }
            }
        }
        if child.try_wait().ok().flatten().is_some() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every message of a stream: (subject, payload, time ms).
pub async fn read_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> Vec<(String, Vec<u8>, i64)> {
    let mut stream = js.get_stream(name).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            out.push((
                m.subject.to_string(),
                m.payload.to_vec(),
                (m.time.unix_timestamp_nanos() / 1_000_000) as i64,
            ));
        }
    }
    out
}

/// Every click in the CLICKS stream, in log order, with the subject of the
/// message that carried it (alone, or in a batch).
pub async fn clicks_in_log(
    js: &async_nats::jetstream::Context,
) -> Vec<(String, proto::clicks::v1::ClickRecorded)> {
    use prost::Message;
    let mut out = Vec::new();
    for (subject, payload, _) in read_stream(js, "CLICKS").await {
        for click in proto::clicks::v1::ClicksRecorded::each(&subject, &payload).unwrap() {
            let click = proto::clicks::v1::ClickRecorded::decode(&click[..]).unwrap();
            out.push((subject.clone(), click));
        }
    }
    out
}
