//! docker-compose.yml cannot run here (no Docker engine), so it is checked: it
//! parses, runs NATS 2.10+ with JetStream and a healthcheck, builds both services,
//! and sets only variables the binaries read.

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
    let command = format!("{:?}", nats["command"]);
    assert!(
        command.contains("-js") || command.contains("--jetstream"),
        "JetStream on: {command}"
    );
    assert!(!nats["healthcheck"].is_null(), "nats has a healthcheck");
    assert!(
        !nats["volumes"].is_null(),
        "nats keeps its data in a volume"
    );

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
        let known = env_names(cmd);
        let env = environment(service);
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
