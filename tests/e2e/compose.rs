//! docker-compose.yml cannot run here (no Docker engine), so it is checked: it
//! parses, runs NATS 2.10+ on `deploy/nats.conf` (JetStream, data in its volume,
//! the monitor port its healthcheck asks, fsync on every write; the local
//! nats-server accepts the file), builds both services, and sets only variables
//! the binaries read, with values they accept.

use std::collections::BTreeSet;

use clap::CommandFactory;
use serde_yaml::Value;

fn env_names(command: clap::Command) -> BTreeSet<String> {
    command
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect()
}

/// `deploy/nats.conf` sets what compose relies on, and the local nats-server
/// (2.9, which predates `sync_interval`) accepts the rest of it.
fn nats_conf_is_valid() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nats.conf"))
        .expect("deploy/nats.conf");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for needed in [
        "http_port: 8222",
        "jetstream {",
        "store_dir: \"/data\"",
        "sync_interval: always",
    ] {
        assert!(lines.contains(&needed), "deploy/nats.conf has {needed:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let older = text.replace("sync_interval: always", "");
    let path = dir.path().join("nats.conf");
    std::fs::write(&path, older).unwrap();
    let binary = [
        "/usr/sbin/nats-server",
        "/usr/local/bin/nats-server",
        "/usr/bin/nats-server",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .unwrap_or("nats-server");
    let out = std::process::Command::new(binary)
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .output()
        .expect("nats-server runs");
    assert!(
        out.status.success(),
        "nats-server -t: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn environment(service: &Value) -> Vec<(String, String)> {
    match &service["environment"] {
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    other => format!("{other:?}"),
                };
                (k.as_str().unwrap().to_owned(), v)
            })
            .collect(),
        Value::Sequence(s) => s
            .iter()
            .map(|e| {
                let (k, v) = e.as_str().unwrap().split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[test]
fn compose_file_sets_only_variables_the_binaries_read() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
        .expect("docker-compose.yml at the top level");
    let doc: Value = serde_yaml::from_str(&text).expect("docker-compose.yml is YAML");
    let services = &doc["services"];

    let nats = &services["nats"];
    let image = nats["image"].as_str().expect("nats image");
    let version = image.split(':').nth(1).expect("a pinned nats tag");
    let (major, minor) = version.split_once('.').expect("tag like 2.10");
    let minor: u32 = minor
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        major == "2" && minor >= 10,
        "NATS 2.10 or later, got {image}"
    );
    let command: Vec<&str> = nats["command"]
        .as_sequence()
        .expect("nats command as a list")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        command,
        ["-c", "/etc/nats/tracker.conf"],
        "NATS on its file"
    );
    let volumes = format!("{:?}", nats["volumes"]);
    assert!(
        volumes.contains("nats-data:/data"),
        "data in a volume: {volumes}"
    );
    assert!(
        volumes.contains("./deploy/nats.conf:/etc/nats/tracker.conf"),
        "the file mounted: {volumes}"
    );
    let health = format!("{:?}", nats["healthcheck"]["test"]);
    assert!(health.contains("127.0.0.1:8222/healthz"), "{health}");
    nats_conf_is_valid();

    for (name, cmd) in [
        ("click-service", click_service::Config::command()),
        ("postback-service", postback_service::Config::command()),
    ] {
        let service = &services[name];
        assert!(
            !service["build"].is_null(),
            "{name} is built from the Dockerfile"
        );
        assert!(
            !service["volumes"].is_null(),
            "{name} keeps its data dir in a volume"
        );
        let known = env_names(cmd.clone());
        let env = environment(service);
        // The values as the binary would read them (an interpolated
        // `${VAR...}` stands for whatever the operator sets).
        let mut args = vec![name.to_owned()];
        for (key, value) in &env {
            let flag = cmd
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|e| e == key.as_str()));
            if let Some(long) = flag.and_then(|a| a.get_long()) {
                let value = if value.starts_with("${") {
                    "set"
                } else {
                    value
                };
                args.push(format!("--{long}={value}"));
            }
        }
        if let Err(error) = cmd.clone().try_get_matches_from(&args) {
            panic!("{name} refuses its compose settings {args:?}: {error}");
        }
        assert!(!env.is_empty(), "{name} is configured by environment");
        for (key, value) in &env {
            assert!(
                known.contains(key),
                "{name} sets {key}, which the binary does not read ({known:?})"
            );
            if key == "NATS_URL" {
                assert!(
                    value.contains("nats:4222"),
                    "{name} talks to the compose NATS: {value}"
                );
            }
        }
        for required in ["NATS_URL", "LISTEN_ADDR", "DATA_DIR", "ADMIN_TOKEN"] {
            assert!(
                env.iter().any(|(k, _)| k == required),
                "{name} sets {required}"
            );
        }
    }
}
