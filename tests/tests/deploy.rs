//! The deployment files in `deploy/` are consistent with the daemon: the
//! Kubernetes manifest parses, its embedded configuration is one the daemon
//! accepts, and its probes and annotations name the ports that configuration
//! listens on; the systemd unit starts the daemon with a readiness protocol
//! the daemon speaks.

use memory_manager::Config;
use yaml_rust2::{Yaml, YamlLoader};

const DAEMONSET: &str = include_str!("../../deploy/kubernetes/daemonset.yaml");
const UNIT: &str = include_str!("../../deploy/memory-manager.service");

fn by_kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    docs.iter().find(|d| d["kind"].as_str() == Some(kind)).unwrap_or_else(|| panic!("no {kind} document"))
}

#[test]
fn the_daemonset_manifest_parses_and_matches_its_configuration() {
    let docs = YamlLoader::load_from_str(DAEMONSET).expect("valid YAML");
    assert_eq!(docs.len(), 2, "a ConfigMap and a DaemonSet");
    let map = by_kind(&docs, "ConfigMap");
    let ds = by_kind(&docs, "DaemonSet");
    assert_eq!(ds["apiVersion"].as_str(), Some("apps/v1"));
    let name = map["metadata"]["name"].as_str().unwrap();

    // The embedded configuration parses with the daemon's own loader.
    let (key, value) = map["data"].as_hash().unwrap().iter().next().unwrap();
    let (file, toml) = (key.as_str().unwrap(), value.as_str().unwrap());
    let config = Config::from_toml(toml).expect("the ConfigMap's configuration is valid");

    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"], ds["spec"]["template"]["metadata"]["labels"],
        "the selector selects the pods"
    );
    let container = &spec["containers"][0];
    let args: Vec<&str> = container["args"].as_vec().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let config_path = args[args.iter().position(|&a| a == "--config").expect("--config") + 1];

    // The file the daemon is told to read is the ConfigMap's key, mounted.
    let mount = container["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|m| config_path.starts_with(m["mountPath"].as_str().unwrap()))
        .expect("the config path is under a mount");
    assert_eq!(config_path, format!("{}/{file}", mount["mountPath"].as_str().unwrap()));
    let volume = spec["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mount's volume exists");
    assert_eq!(volume["configMap"]["name"].as_str(), Some(name));

    // The attach socket's directory is the host path shared with machines,
    // and the state directory a host path that outlives the pod, each
    // mounted where the configuration says.
    let host_path = |dir: &std::path::Path| {
        let mount = container["volumeMounts"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"].as_str() == dir.to_str())
            .unwrap_or_else(|| panic!("{} is not mounted", dir.display()));
        let volume = spec["volumes"].as_vec().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
        volume["hostPath"]["path"].as_str().map(str::to_string)
    };
    assert_eq!(
        host_path(config.attach_socket.parent().unwrap()).as_deref(),
        config.attach_socket.parent().unwrap().to_str()
    );
    assert_eq!(host_path(&config.state_dir).as_deref(), config.state_dir.to_str());

    // Probes and scrape annotations name the configured ports.
    assert_eq!(container["readinessProbe"]["grpc"]["port"].as_i64(), Some(config.grpc_listen.port() as i64));
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"].as_str(), Some(config.metrics_listen.port().to_string().as_str()));
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));
    assert_eq!(spec["hostNetwork"].as_bool(), Some(true), "loopback ports are the node's");
    // It may lower its own oom_score_adj, as its configuration asks.
    assert!(config.oom_score_adj.is_some_and(|v| v < 0));
    let caps = container["securityContext"]["capabilities"]["add"].as_vec().unwrap();
    assert!(caps.iter().any(|c| c.as_str() == Some("SYS_RESOURCE")), "{caps:?}");
}

#[test]
fn the_systemd_unit_waits_for_readiness_and_reads_the_example_configuration() {
    let value =
        |key: &str| UNIT.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('='))).map(str::trim);
    assert_eq!(value("Type"), Some("notify"), "the daemon sends READY=1 (tested in end_to_end)");
    let exec = value("ExecStart").unwrap();
    assert!(exec.contains("memory-manager --config /etc/faultline/memory-manager.toml"), "{exec}");
    assert_eq!(value("RuntimeDirectory"), Some("faultline"), "/run/faultline holds the attach socket");
    assert_eq!(value("RuntimeDirectoryPreserve"), Some("restart"), "machines re-attach to the same socket path");
    assert_eq!(value("StateDirectory"), Some("faultline"), "/var/lib/faultline outlives the daemon");
    let example = Config::from_toml(include_str!("../../deploy/memory-manager.toml")).unwrap();
    assert_eq!(value("OOMScoreAdjust"), example.oom_score_adj.map(|v| v.to_string()).as_deref());
    assert!(example.oom_score_adj.is_some_and(|v| v < 0), "the daemon is not the OOM killer's first choice");
    assert!(example.attach_socket.starts_with("/run/faultline"));
    assert_eq!(example.state_dir, std::path::Path::new("/var/lib/faultline"));
}
