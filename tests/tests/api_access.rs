//! Who may change the daemon over gRPC: plain TCP observes only, the Unix
//! socket serves everything, and TCP with mutual TLS serves clients whose
//! certificate the configured CA signed (certificates made here with rcgen).

use faultline_proto::client::{connect, Address, ClientTls};
use faultline_proto::v1::policy_control_client::PolicyControlClient;
use faultline_proto::v1::{GetPolicyStatusRequest, UseDefaultRequest, UsePolicyRequest};
use faultline_system_tests::{Daemon, PolicyProcess};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tonic::Code;

/// A certificate authority that issues certificates for the test.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Self { pem, issuer: Issuer::new(params, key) }
    }

    /// A certificate for `name` (a DNS name) and its key, both PEM.
    fn issue(&self, name: &str, usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages.push(usage);
        let key = KeyPair::generate().unwrap();
        (params.signed_by(&key, &self.issuer).unwrap().pem(), key.serialize_pem())
    }
}

/// Writes `name`.pem and `name`.key under `dir`; their paths.
fn write_pair(
    dir: &std::path::Path,
    name: &str,
    (cert, key): (String, String),
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c, k)
}

/// UsePolicy `endpoint` at `address` with `tls`: the status code, or Ok.
async fn use_policy(address: &Address, tls: &ClientTls, endpoint: &str) -> Result<String, String> {
    let channel = connect(address, tls).await.map_err(|e| e.to_string())?;
    let req = UsePolicyRequest { endpoint: endpoint.into(), reconnect: None };
    match PolicyControlClient::new(channel).use_policy(req).await {
        Ok(status) => Ok(status.into_inner().active),
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    }
}

async fn active_policy(daemon: &Daemon) -> String {
    let mut pc = PolicyControlClient::new(daemon.unix_channel().await);
    pc.get_policy_status(GetPolicyStatusRequest {}).await.unwrap().into_inner().active
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_observes_and_is_denied_mutations_that_the_unix_socket_serves() {
    let daemon = Daemon::start(&["--spin-polls", "0"]);
    let policy = PolicyProcess::start("policy-sequential", &[]);
    let tcp: Address = daemon.grpc_addr().parse().unwrap();
    let none = ClientTls::default();

    let denied = use_policy(&tcp, &none, &policy.endpoint).await.unwrap_err();
    assert!(denied.starts_with("PermissionDenied: UsePolicy changes the daemon"), "{denied}");
    assert!(denied.contains(&daemon.grpc_unix_addr()), "the refusal names the socket: {denied}");
    let mut over_tcp = PolicyControlClient::connect(daemon.grpc_addr()).await.unwrap();
    let denied = over_tcp.use_default(UseDefaultRequest {}).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    // Refused before anything is looked up: no VM 99 is attached, and the
    // answer does not say so.
    let mut control = faultline_proto::v1::control_client::ControlClient::connect(daemon.grpc_addr()).await.unwrap();
    let clear = faultline_proto::v1::GetDirtyLogRequest { vm_id: 99, memslot: 0, peek: false };
    assert_eq!(control.get_dirty_log(clear).await.unwrap_err().code(), Code::PermissionDenied);
    let peek = faultline_proto::v1::GetDirtyLogRequest { vm_id: 99, memslot: 0, peek: true };
    assert_eq!(control.get_dirty_log(peek).await.unwrap_err().code(), Code::NotFound, "peeking observes");
    // Observation is served, and nothing changed.
    let status = over_tcp.get_policy_status(GetPolicyStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.active, "default");

    let unix: Address = daemon.grpc_unix_addr().parse().unwrap();
    assert_eq!(use_policy(&unix, &none, &policy.endpoint).await, Ok("sequential-4k".to_string()));
    assert_eq!(active_policy(&daemon).await, "sequential-4k");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_serves_mutations_to_certificates_the_ca_signed_and_refuses_others() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("faultline test CA");
    let stranger = Ca::new("another CA");
    std::fs::write(d.join("ca.pem"), &ca.pem).unwrap();
    let (server_cert, server_key) = write_pair(d, "server", ca.issue("localhost", ExtendedKeyUsagePurpose::ServerAuth));
    let (client_cert, client_key) = write_pair(d, "client", ca.issue("operator", ExtendedKeyUsagePurpose::ClientAuth));
    let (wrong_cert, wrong_key) =
        write_pair(d, "wrong", stranger.issue("operator", ExtendedKeyUsagePurpose::ClientAuth));
    // The client CA is also the one that signed the server's certificate.
    let config = d.join("memory-manager.toml");
    std::fs::write(
        &config,
        format!("[grpc_tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n", server_cert, server_key, d.join("ca.pem")),
    )
    .unwrap();
    let daemon = Daemon::start(&["--config", config.to_str().unwrap(), "--spin-polls", "0"]);
    // grpc_addr waits for the line that says how TCP is served.
    let port = daemon.grpc_addr().rsplit(':').next().unwrap().to_string();
    assert!(daemon.log().contains("mutual_tls=true"), "{}", daemon.log());
    let policy = PolicyProcess::start("policy-sequential", &[]);
    let https: Address = format!("https://localhost:{port}").parse().unwrap();
    let ca_only = ClientTls { ca: Some(d.join("ca.pem")), ..ClientTls::default() };
    let tls = |cert: &std::path::Path, key: &std::path::Path| ClientTls {
        cert: Some(cert.to_path_buf()),
        key: Some(key.to_path_buf()),
        ..ca_only.clone()
    };

    // A certificate another CA signed, no certificate, plain HTTP: refused,
    // and the policy in force stays.
    let wrong = use_policy(&https, &tls(&wrong_cert, &wrong_key), &policy.endpoint).await;
    assert!(wrong.is_err(), "a stranger's certificate was accepted: {wrong:?}");
    let anonymous = use_policy(&https, &ca_only, &policy.endpoint).await;
    assert!(anonymous.is_err(), "a client without a certificate was accepted: {anonymous:?}");
    let plain: Address = format!("http://127.0.0.1:{port}").parse().unwrap();
    let plain = use_policy(&plain, &ClientTls::default(), &policy.endpoint).await;
    assert!(plain.is_err(), "plain HTTP/2 on the TLS port was served: {plain:?}");
    assert_eq!(active_policy(&daemon).await, "default");
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());

    // The CA's client: every call, mutating ones included.
    let right = tls(&client_cert, &client_key);
    assert_eq!(use_policy(&https, &right, &policy.endpoint).await, Ok("sequential-4k".to_string()));
    assert_eq!(active_policy(&daemon).await, "sequential-4k");

    // The CLI, as an operator runs it.
    let out = std::process::Command::new(faultline_system_tests::binary("faultline"))
        .args(["--server", &https.to_string(), "--tls-ca"])
        .arg(d.join("ca.pem"))
        .arg("--tls-cert")
        .arg(&client_cert)
        .arg("--tls-key")
        .arg(&client_key)
        .args(["policy", "default"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("policy: default"), "{text}");
}

#[test]
fn a_daemon_that_cannot_read_its_tls_files_says_which_and_takes_no_vm() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("memory-manager.toml");
    std::fs::write(&config, "[grpc_tls]\ncert = \"/nonexistent/server.pem\"\nkey = \"k\"\nclient_ca = \"c\"\n")
        .unwrap();
    let socket = dir.path().join("attach.sock");
    let out = std::process::Command::new(faultline_system_tests::binary("memory-manager"))
        .arg("--config")
        .arg(&config)
        .arg("--attach-socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--grpc-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("grpc_tls: cannot read /nonexistent/server.pem"), "{stderr}");
    assert!(!socket.exists(), "the attach socket was bound before the TLS files were read");
}
