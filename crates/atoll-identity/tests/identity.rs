//! The CA, identities and tokens, checked the way nodes will use them: a
//! certificate issued from a node's request carries its identity through a
//! real mTLS handshake, rotation keeps the root, and secrets stay secret.

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use atoll_identity::{
    AtollId, Authority, CaOptions, IssueRequest, KeySource, Role, Token, TokenKind,
    id_of_certificate, key_and_request,
};
use atoll_transport::{ClientTls, ControlUrls, Identity, Peer, ServerTls, Transport, Trust, serve};
use axum::extract::Extension;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

fn id(text: &str) -> AtollId {
    text.parse().expect("identity")
}

#[test]
fn identities_read_back_and_bad_ones_say_what_is_wrong() {
    let gateway = id("atoll://default/gateway/hz-a/gw-1");
    assert_eq!(gateway.role, Role::Gateway);
    assert_eq!(gateway.zone, "hz-a");
    assert_eq!(gateway.to_string(), "atoll://default/gateway/hz-a/gw-1");
    assert!(!id("atoll://default/control/-/replica-1").has_zone());
    for (text, needle) in [
        ("https://default/gateway/hz-a/gw-1", "atoll://"),
        ("atoll://default/gateway/hz-a", "four parts"),
        ("atoll://default/king/hz-a/gw-1", "the role"),
        ("atoll://Default/gateway/hz-a/gw-1", "workspace"),
        ("atoll://default/gateway/hz_a/gw-1", "zone"),
        ("atoll://default/gateway/hz-a/", "name"),
    ] {
        let error = text.parse::<AtollId>().expect_err(text).to_string();
        assert!(error.contains(needle), "{text}: {error}");
    }
}

#[test]
fn a_new_ca_keeps_its_keys_private_and_will_not_overwrite_itself() {
    let dir = tempfile::tempdir().expect("dir");
    let ca_dir = dir.path().join("ca");
    Authority::init(&ca_dir, &CaOptions::default()).expect("init");
    let mode = |file: &str| {
        std::fs::metadata(ca_dir.join(file))
            .expect("exists")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("root.key"), 0o600);
    assert_eq!(mode("intermediate.key"), 0o600);
    assert_eq!(
        std::fs::metadata(&ca_dir)
            .expect("dir")
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    let error = Authority::init(&ca_dir, &CaOptions::default()).expect_err("refused");
    assert!(error.to_string().contains("already holds a CA"), "{error}");
}

async fn whoami(Extension(peer): Extension<Peer>) -> Json<Value> {
    let id = peer
        .certificates
        .as_ref()
        .and_then(|chain| chain.first())
        .map(|leaf| id_of_certificate(leaf).map(|i| i.to_string()));
    Json(json!({"id": id.map(|r| r.unwrap_or_else(|e| format!("error: {e}")))}))
}

/// Serves `whoami` with a control-plane certificate from `ca`, trusting
/// client certificates of the same root; returns the URL.
async fn server(ca: &Authority) -> String {
    let control = id("atoll://default/control/-/replica-1");
    let issued = ca
        .issue(&IssueRequest {
            id: &control,
            key: KeySource::Generate,
            lifetime: Duration::from_secs(3600),
            hosts: &["127.0.0.1".to_owned(), "localhost".to_owned()],
        })
        .expect("server certificate");
    let identity = Identity::from_pem(
        issued.chain_pem.as_bytes(),
        issued.key_pem.expect("made here").as_bytes(),
        "the replica",
    )
    .expect("identity");
    let trust = Trust::from_pem(ca.trust_pem().as_bytes(), "the root").expect("trust");
    let tls = ServerTls::new(&identity, Some(&trust)).expect("server tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("https://{}", listener.local_addr().expect("address"));
    let app = Router::new().route("/whoami", get(whoami));
    tokio::spawn(serve(listener, app, Some(tls), std::future::pending()));
    url
}

/// A node's key and request, a certificate from `ca`, and a call as it.
async fn call_as(ca: &Authority, trust_pem: &str, node: &AtollId, url: &str) -> Value {
    let (key_pem, csr_pem) = key_and_request(node).expect("request");
    let issued = ca
        .issue(&IssueRequest {
            id: node,
            key: KeySource::Csr(&csr_pem),
            lifetime: Duration::from_secs(24 * 3600),
            hosts: &[],
        })
        .expect("issued");
    assert!(issued.key_pem.is_none(), "the node's key never leaves it");
    let identity = Identity::from_pem(issued.chain_pem.as_bytes(), key_pem.as_bytes(), "node")
        .expect("identity");
    let trust = Trust::from_pem(trust_pem.as_bytes(), "the root").expect("trust");
    let tls = ClientTls::new(&trust, Some(&identity)).expect("client tls");
    Transport::with_tls(tls)
        .rest(
            ControlUrls::parse_in_order(url).expect("url"),
            Some(Duration::from_secs(5)),
        )
        .get("/whoami")
        .await
        .expect("answered")
}

#[tokio::test]
async fn a_certificate_issued_from_a_nodes_request_carries_its_identity_over_mtls() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = Authority::init(&dir.path().join("ca"), &CaOptions::default()).expect("init");
    let url = server(&ca).await;
    let agent = id("atoll://payments/agent/hz-a/agent-hz-a");
    let answer = call_as(&ca, ca.trust_pem(), &agent, &url).await;
    assert_eq!(answer["id"], agent.to_string(), "{answer}");
}

#[tokio::test]
async fn a_rotated_intermediate_keeps_the_root_so_old_and_new_certificates_both_work() {
    let dir = tempfile::tempdir().expect("dir");
    let ca_dir = dir.path().join("ca");
    let before = Authority::init(&ca_dir, &CaOptions::default()).expect("init");
    let url = server(&before).await;
    let after = Authority::rotate(&ca_dir, Duration::from_secs(30 * 24 * 3600)).expect("rotate");
    assert_ne!(before.intermediate_pem(), after.intermediate_pem());
    assert_eq!(before.trust_pem(), after.trust_pem(), "the root stays");
    // The server's certificate is from the old intermediate; the node's
    // from the new one; both chain to the root both trust.
    let node = id("atoll://default/gateway/hz-a/gw-1");
    let answer = call_as(&after, after.trust_pem(), &node, &url).await;
    assert_eq!(answer["id"], node.to_string(), "{answer}");
    // The CA on disk is the new one.
    let loaded = Authority::load(&ca_dir).expect("load");
    assert_eq!(loaded.intermediate_pem(), after.intermediate_pem());
    // A node tells which intermediate signed its chain.
    let issued = after
        .issue(&IssueRequest {
            id: &node,
            key: KeySource::Generate,
            lifetime: Duration::from_secs(3600),
            hosts: &[],
        })
        .expect("issued");
    let new = atoll_identity::fingerprints_of_pem(after.intermediate_pem());
    assert_eq!(new.len(), 1);
    assert_eq!(
        atoll_identity::intermediate_of_chain(&issued.chain_pem).as_ref(),
        Some(&new[0])
    );
    assert_ne!(
        atoll_identity::fingerprints_of_pem(before.intermediate_pem()),
        new
    );
    // Caught between rotate's two writes (the new key beside the old
    // certificate), the CA refuses to sign rather than sign with a key
    // its certificate does not name.
    std::fs::write(ca_dir.join("intermediate.pem"), before.intermediate_pem()).expect("write");
    let error = Authority::load(&ca_dir).expect_err("a mismatched pair");
    assert!(error.to_string().contains("is not the key of"), "{error}");
}

#[tokio::test]
async fn an_intermediate_the_user_brings_issues_as_atolls_own_does() {
    let dir = tempfile::tempdir().expect("dir");
    // The user's own PKI, here made by another Atoll CA.
    let theirs = Authority::init(&dir.path().join("theirs"), &CaOptions::default()).expect("init");
    let key = std::fs::read_to_string(dir.path().join("theirs/intermediate.key")).expect("key");
    let brought = Authority::bring_your_own(
        &dir.path().join("ours"),
        theirs.trust_pem(),
        theirs.intermediate_pem(),
        &key,
    )
    .expect("brought");
    assert!(
        !dir.path().join("ours/root.key").exists(),
        "the user keeps their root key"
    );
    let url = server(&brought).await;
    let node = id("atoll://default/sdk/hz-a/bank-rz01-0");
    let answer = call_as(&brought, theirs.trust_pem(), &node, &url).await;
    assert_eq!(answer["id"], node.to_string());

    // A key that is not the intermediate's is refused.
    let other = Authority::init(&dir.path().join("other"), &CaOptions::default()).expect("init");
    let wrong = std::fs::read_to_string(dir.path().join("other/intermediate.key")).expect("key");
    let error = Authority::bring_your_own(
        &dir.path().join("mixed"),
        theirs.trust_pem(),
        theirs.intermediate_pem(),
        &wrong,
    )
    .expect_err("refused");
    assert!(error.to_string().contains("does not belong"), "{error}");
    drop(other);
}

#[test]
fn a_request_gets_only_its_identity_and_a_broken_one_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = Authority::init(&dir.path().join("ca"), &CaOptions::default()).expect("init");
    // The request names one identity; the CA issues for the identity it
    // was asked to (what the bootstrap token allows), not the request's.
    let (_, csr) = key_and_request(&id("atoll://default/control/-/evil")).expect("request");
    let node = id("atoll://default/gateway/hz-a/gw-1");
    let issued = ca
        .issue(&IssueRequest {
            id: &node,
            key: KeySource::Csr(&csr),
            lifetime: Duration::from_secs(3600),
            hosts: &[],
        })
        .expect("issued");
    let leaf: rustls_pki_types::CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::from_pem_slice(issued.chain_pem.as_bytes()).expect("pem");
    assert_eq!(id_of_certificate(&leaf).expect("id"), node);
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).expect("x509");
    assert!(!parsed.is_ca());
    let lifetime = issued.not_after - time::OffsetDateTime::now_utc();
    assert!(lifetime <= time::Duration::hours(1) && lifetime > time::Duration::minutes(58));

    let error = ca
        .issue(&IssueRequest {
            id: &node,
            key: KeySource::Csr(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            ),
            lifetime: Duration::from_secs(3600),
            hosts: &[],
        })
        .expect_err("refused");
    assert!(
        error.to_string().contains("signing request is not valid"),
        "{error}"
    );
}

#[test]
fn tokens_read_back_match_only_their_hash_and_never_print_their_secret() {
    let token = Token::generate(TokenKind::Bootstrap);
    let text = token.to_string();
    assert!(text.starts_with("atb_"), "{text}");
    let parsed = Token::parse(&format!(" {text}\n")).expect("parses");
    assert_eq!(parsed, token);
    let stored = token.hash();
    assert!(parsed.matches(&stored));
    assert!(!Token::generate(TokenKind::Bootstrap).matches(&stored));
    assert!(
        !format!("{token:?}").contains(&text[21..]),
        "Debug hides the secret"
    );
    let api = Token::generate(TokenKind::Api);
    assert!(api.to_string().starts_with("atk_"));
    for bad in [
        "",
        "atk_abc",
        "xyz_0123456789abcdef_00",
        &text.replace("atb_", "atx_"),
    ] {
        let error = Token::parse(bad).expect_err(bad).to_string();
        assert!(error.contains("atoll token create"), "{error}");
    }
}
