//! The analyzer's gRPC over TLS with real certificates made here (rcgen): the real CLI with
//! tokens of each role, an agent stream admitted by its client certificate (mTLS), and
//! plaintext refused where it is not allowed.
mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use afetm_auth::ClientAuth;
use afetm_proto::{self as pb, ingest_client::IngestClient};
use common::{Kill, bin};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio_stream::wrappers::ReceiverStream;

const PORT: u16 = 28995;
const READ: &str = "read-token-0123456789";
const CONTROL: &str = "control-token-0123456789";
const AGENT: &str = "agent-token-0123456789";
/// The web view of the TLS test's analyzer.
const WEB: &str = "127.0.0.1:28994";

struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    stranger: (PathBuf, PathBuf),
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A CA, a server certificate for localhost signed by it, a client certificate signed by it,
/// and a client certificate from another CA.
fn pki(dir: &Path) -> Pki {
    let ca_params = {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p
    };
    let ca = CertifiedIssuer::self_signed(ca_params.clone(), KeyPair::generate().unwrap()).unwrap();
    let other_ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>, issuer: &CertifiedIssuer<'_, KeyPair>, stem: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, issuer).unwrap();
        (write(dir, &format!("{stem}.pem"), &cert.pem()), write(dir, &format!("{stem}.key"), &key.serialize_pem()))
    };
    Pki {
        ca: write(dir, "ca.pem", &ca.pem()),
        server: leaf(vec!["localhost".into(), "127.0.0.1".into()], &ca, "server"),
        client: leaf(vec!["agent-1".into()], &ca, "client"),
        stranger: leaf(vec!["agent-2".into()], &other_ca, "stranger"),
    }
}

/// The real CLI against the TLS analyzer; (success, stdout + stderr).
fn cli(dir: &Path, token: Option<&str>, args: &[&str]) -> (bool, String) {
    let mut c = Command::new(bin("afetm-analyzer"));
    c.args(args).args(["--server", &format!("https://localhost:{PORT}"), "--tls-ca"]).arg(dir.join("ca.pem"));
    if let Some(t) = token {
        c.arg("--token-file").arg(write(dir, "client.token", t));
    }
    let o = c.output().unwrap();
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

async fn hello(auth: &ClientAuth) -> Result<pb::Welcome, tonic::Status> {
    let channel = auth
        .endpoint(&format!("https://localhost:{PORT}"))
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    let mut client = IngestClient::new(afetm_auth::AuthChannel::new(channel, auth.interceptor()));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let h = pb::Hello { agent_id: "tls-agent".into(), instance: 9, hostname: "h".into(), target: "t".into() };
    tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(h)) }).await.unwrap();
    let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await? {
        Some(pb::AnalyzerMessage { msg: Some(pb::analyzer_message::Msg::Welcome(w)) }) => Ok(w),
        other => panic!("no welcome: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_tokens_and_client_certificates_gate_each_service() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = pki(d);
    let tokens = write(d, "tokens", &format!("# roles\nread {READ}\ncontrol {CONTROL}\nagent {AGENT}\n"));
    let child = Command::new(bin("afetm-analyzer"))
        .args(["serve", "--listen", &format!("127.0.0.1:{PORT}"), "--db"])
        .arg(d.join("db.sqlite"))
        .arg("--tls-cert")
        .arg(&pki.server.0)
        .arg("--tls-key")
        .arg(&pki.server.1)
        .arg("--tls-client-ca")
        .arg(&pki.ca)
        .arg("--tokens")
        .arg(&tokens)
        .args(["--http-listen", WEB])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _kill = Kill(vec![child]);
    let t = Instant::now();
    while !cli(d, Some(READ), &["stats"]).0 {
        assert!(t.elapsed() < Duration::from_secs(30), "analyzer not up: {}", cli(d, Some(READ), &["stats"]).1);
        std::thread::sleep(Duration::from_millis(100));
    }

    // Query: a read token works; none, or a wrong one, does not.
    let (ok, out) = cli(d, None, &["stats"]);
    assert!(!ok && out.contains("bearer token"), "{out}");
    let (ok, out) = cli(d, Some("wrong-token-0123456789"), &["stats"]);
    assert!(!ok && out.contains("unknown token"), "{out}");
    // Control: a read token is refused, a control token passes (to "no such agent").
    let plan =
        write(d, "plan.json", r#"{"target":{"path":"/bin/true"},"points":[{"function":"main","mode":"event"}]}"#);
    let set = ["set-plan", "--agent", "nobody", "--plan", plan.to_str().unwrap()];
    let (ok, out) = cli(d, Some(READ), &set);
    assert!(!ok && out.contains("may not call Control"), "{out}");
    let (ok, out) = cli(d, Some(CONTROL), &set);
    assert!(!ok && !out.contains("may not") && out.contains("nobody"), "{out}");
    // Plaintext to a TLS port fails.
    let (ok, out) = {
        let o = Command::new(bin("afetm-analyzer"))
            .args(["stats", "--server", &format!("http://127.0.0.1:{PORT}")])
            .output()
            .unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    assert!(!ok, "{out}");

    // Ingest: the client certificate admits the agent; a stranger's certificate or no
    // certificate (and no token) does not.
    let mtls = ClientAuth { ca: Some(pki.ca.clone()), identity: Some(pki.client.clone()), ..Default::default() };
    assert_eq!(hello(&mtls).await.unwrap().last_acked_seq, 0);
    let bare = ClientAuth { ca: Some(pki.ca.clone()), ..Default::default() };
    assert_eq!(hello(&bare).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    let stranger = ClientAuth { ca: Some(pki.ca.clone()), identity: Some(pki.stranger.clone()), ..Default::default() };
    assert!(hello(&stranger).await.is_err(), "a certificate from another CA must not be accepted");
    // A control token also admits an agent.
    let token = ClientAuth { ca: Some(pki.ca.clone()), token: Some(CONTROL.into()), ..Default::default() };
    assert!(hello(&token).await.is_ok());
    web_view_needs_a_read_token();
}

/// The web view of an analyzer with `--tokens`: a browser is asked for the token (401 with a
/// Basic challenge); a read token as the Basic password or a control token as a bearer gets
/// the page; an agent token is forbidden.
fn web_view_needs_a_read_token() {
    use base64::Engine as _;
    let get = |auth: Option<String>| {
        let headers: Vec<(&str, &str)> = auth.as_deref().map(|a| ("Authorization", a)).into_iter().collect();
        testbed::scrape::get_with(WEB, "/", &headers).unwrap()
    };
    let basic =
        |token: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("me:{token}")));
    let (status, headers, _) = get(None);
    assert!(status.contains(" 401"), "{status}");
    assert!(headers.iter().any(|h| h.to_lowercase() == "www-authenticate: basic realm=\"afetm\""), "{headers:?}");
    let (status, _, body) = get(Some(basic(READ)));
    assert!(status.contains(" 200") && body.contains("Agents"), "{status}");
    let (status, _, _) = get(Some(format!("Bearer {CONTROL}")));
    assert!(status.contains(" 200"), "{status}");
    let (status, _, _) = get(Some(basic(AGENT)));
    assert!(status.contains(" 403"), "{status}");
    let (status, _, _) = get(Some(basic("wrong-token-0123456789")));
    assert!(status.contains(" 401"), "{status}");
}

#[test]
fn plaintext_is_refused_off_loopback_unless_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(bin("afetm-analyzer"))
        .args(["serve", "--listen", "0.0.0.0:0", "--db"])
        .arg(dir.path().join("db.sqlite"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("not a loopback address") && err.contains("--insecure"), "{err}");
    let o = Command::new(bin("afetm-analyzer")).args(["stats", "--server", "http://192.0.2.7:50051"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("not a loopback address"), "{err}");
}
