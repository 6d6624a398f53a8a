//! The transport against a real server on loopback: TLS with and without
//! client certificates, certificates replaced while connections stay open,
//! moving past a dead replica, and the API's errors kept whole.

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

use std::time::Duration;

use atoll_api::rest::{ErrorBody, ErrorCode};
use atoll_transport::{
    ClientTls, ControlUrls, Identity, Peer, RestError, ServerTls, Transport, Trust, serve,
};
use axum::extract::Extension;
use axum::routing::get;
use axum::{Json, Router};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A root CA that signs server and client certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("root"),
        }
    }

    fn trust(&self) -> Trust {
        Trust::from_pem(self.issuer.pem().as_bytes(), "the test CA").expect("trust")
    }

    fn server(&self) -> Identity {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        self.issue(params)
    }

    fn client(&self, id: &str) -> Identity {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .subject_alt_names
            .push(SanType::URI(id.try_into().expect("uri")));
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Identity {
        let key = KeyPair::generate().expect("key");
        let certificate = params.signed_by(&key, &self.issuer).expect("sign");
        Identity::from_pem(
            certificate.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            "a test certificate",
        )
        .expect("identity")
    }
}

/// The URI SAN of the client certificate the server saw, or null.
async fn whoami(Extension(peer): Extension<Peer>) -> Json<Value> {
    let id = peer.certificates.as_ref().and_then(|chain| {
        let (_, certificate) = x509_parser::parse_x509_certificate(chain.first()?).ok()?;
        let names = certificate.subject_alternative_name().ok()??;
        names
            .value
            .general_names
            .iter()
            .find_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
                _ => None,
            })
    });
    Json(json!({"id": id, "remote": peer.remote.to_string()}))
}

async fn refuse() -> (axum::http::StatusCode, Json<ErrorBody>) {
    (
        axum::http::StatusCode::CONFLICT,
        Json(ErrorBody {
            status: 409,
            error: ErrorCode::Conflict,
            message: "Cell/rz01 changed since it was read; read it again".into(),
            issues: Vec::new(),
        }),
    )
}

struct Server {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(tls: Option<ServerTls>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let app = Router::new()
            .route("/whoami", get(whoami))
            .route("/refuse", get(refuse));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(listener, app, tls, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        });
        Self {
            url: format!("{scheme}://{address}"),
            stop: Some(stop),
            task,
        }
    }

    /// The port it listens on.
    fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port")
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

fn urls(text: &str) -> ControlUrls {
    ControlUrls::parse_in_order(text).expect("urls")
}

#[tokio::test]
async fn a_client_certificate_reaches_the_handler_and_a_client_without_one_is_let_through() {
    let ca = Ca::new("atoll test root");
    let server_tls = ServerTls::new(&ca.server(), Some(&ca.trust())).expect("server tls");
    let server = Server::start(Some(server_tls)).await;

    let node = ClientTls::new(
        &ca.trust(),
        Some(&ca.client("atoll://default/gateway/hz-a/gw-1")),
    )
    .expect("client tls");
    let rest = Transport::with_tls(node).rest(urls(&server.url), Some(Duration::from_secs(5)));
    let answer: Value = rest.get("/whoami").await.expect("whoami");
    assert_eq!(
        answer["id"], "atoll://default/gateway/hz-a/gw-1",
        "{answer}"
    );

    let anonymous = ClientTls::new(&ca.trust(), None).expect("client tls");
    let rest = Transport::with_tls(anonymous).rest(urls(&server.url), Some(Duration::from_secs(5)));
    let answer: Value = rest.get("/whoami").await.expect("whoami");
    assert_eq!(answer["id"], Value::Null, "{answer}");
    server.stop().await;
}

#[tokio::test]
async fn a_certificate_of_another_ca_is_refused_in_the_handshake_both_ways() {
    let ca = Ca::new("atoll test root");
    let other = Ca::new("somebody else");
    let server = Server::start(Some(
        ServerTls::new(&ca.server(), Some(&ca.trust())).expect("server tls"),
    ))
    .await;

    // A client certificate from another CA.
    let stranger = ClientTls::new(
        &ca.trust(),
        Some(&other.client("atoll://default/gateway/hz-a/gw-1")),
    )
    .expect("client tls");
    let rest = Transport::with_tls(stranger).rest(urls(&server.url), Some(Duration::from_secs(5)));
    let error = rest.get::<Value>("/whoami").await.expect_err("refused");
    assert!(
        matches!(
            error,
            RestError::Unreachable { .. } | RestError::Broken { .. }
        ),
        "{error:?}"
    );

    // A server whose certificate chains to a root this client does not trust.
    let wary = ClientTls::new(&other.trust(), None).expect("client tls");
    let rest = Transport::with_tls(wary).rest(urls(&server.url), Some(Duration::from_secs(5)));
    let error = rest.get::<Value>("/whoami").await.expect_err("refused");
    let text = error.to_string();
    assert!(text.contains("certificate"), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn a_renewed_certificate_is_used_for_new_connections_and_open_ones_stay_up() {
    let ca = Ca::new("atoll test root");
    let server_tls = ServerTls::new(&ca.server(), Some(&ca.trust())).expect("server tls");
    let server = Server::start(Some(server_tls.clone())).await;
    let tls = ClientTls::new(
        &ca.trust(),
        Some(&ca.client("atoll://default/agent/hz-a/one")),
    )
    .expect("client tls");
    let transport = Transport::with_tls(tls.clone());
    let pooled = transport.rest(urls(&server.url), Some(Duration::from_secs(5)));
    let first: Value = pooled.get("/whoami").await.expect("whoami");
    assert_eq!(first["id"], "atoll://default/agent/hz-a/one");

    // Renewed: the pooled connection stays up, with the identity it was
    // opened with (same local port); a new connection presents the new one.
    tls.set_identity(&ca.client("atoll://default/agent/hz-a/two"));
    server_tls.set_identity(&ca.server());
    let again: Value = pooled.get("/whoami").await.expect("whoami");
    assert_eq!(again["remote"], first["remote"], "the connection was kept");
    assert_eq!(again["id"], "atoll://default/agent/hz-a/one");
    let fresh = transport.rest(urls(&server.url), Some(Duration::from_secs(5)));
    let renewed: Value = fresh.get("/whoami").await.expect("whoami");
    assert_eq!(renewed["id"], "atoll://default/agent/hz-a/two");
    assert_ne!(renewed["remote"], first["remote"]);

    // New roots: a client of another CA is let in once the server trusts it.
    let other = Ca::new("the next root");
    let newcomer = ClientTls::new(
        &ca.trust(),
        Some(&other.client("atoll://default/sdk/hz-a/bank-1")),
    )
    .expect("client tls");
    let rest = Transport::with_tls(newcomer).rest(urls(&server.url), Some(Duration::from_secs(5)));
    assert!(rest.get::<Value>("/whoami").await.is_err());
    server_tls
        .set_client_trust(&other.trust())
        .expect("client trust");
    let answer: Value = rest.get("/whoami").await.expect("whoami");
    assert_eq!(answer["id"], "atoll://default/sdk/hz-a/bank-1");
    server.stop().await;
}

#[tokio::test]
async fn a_replica_that_cannot_be_reached_is_passed_over_and_api_errors_are_kept() {
    let server = Server::start(None).await;
    // A port nothing listens on.
    let dead = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dead_url = format!("http://{}", dead.local_addr().expect("address"));
    drop(dead);
    let list = urls(&format!("{dead_url},{}", server.url));
    let rest = Transport::plain().rest(list.clone(), Some(Duration::from_secs(5)));
    let _: Value = rest
        .get("/whoami")
        .await
        .expect("the second replica answers");
    assert_eq!(
        list.current(),
        server.url,
        "the live replica is used from now on"
    );

    match rest.get::<Value>("/refuse").await {
        Err(RestError::Api { status, body }) => {
            assert_eq!(status.as_u16(), 409);
            assert_eq!(body.error, ErrorCode::Conflict);
            assert!(body.message.contains("read it again"), "{}", body.message);
        }
        other => panic!("expected the API's error, got {other:?}"),
    }
    match rest.get::<Value>("/nowhere").await {
        Err(RestError::Unexpected { status, .. }) => assert_eq!(status.as_u16(), 404),
        other => panic!("expected a non-API answer, got {other:?}"),
    }

    let none = Transport::plain().rest(urls(&dead_url), Some(Duration::from_secs(5)));
    let error = none.get::<Value>("/whoami").await.expect_err("unreachable");
    assert!(
        matches!(&error, RestError::Unreachable { urls, .. } if urls == &dead_url),
        "{error:?}"
    );
    assert!(error.to_string().contains("refused"), "{error}");
    server.stop().await;
}

#[tokio::test]
async fn an_https_url_without_a_ca_bundle_is_refused_with_what_to_do() {
    let rest = Transport::plain().rest(urls("https://127.0.0.1:1"), None);
    let error = rest.get::<Value>("/v1/leader").await.expect_err("refused");
    assert!(matches!(error, RestError::Invalid(_)), "{error:?}");
    assert!(error.to_string().contains("CA bundle"), "{error}");
    let channels = Transport::plain().channels(Default::default());
    let error = channels
        .connect_lazy("https://127.0.0.1:1")
        .expect_err("refused");
    assert!(error.contains("CA bundle"), "{error}");
}

#[tokio::test]
async fn a_grpc_channel_speaks_http2_over_tls_with_the_client_certificate() {
    use tower::ServiceExt as _;
    let ca = Ca::new("atoll test root");
    let server = Server::start(Some(
        ServerTls::new(&ca.server(), Some(&ca.trust())).expect("server tls"),
    ))
    .await;
    let tls = ClientTls::new(
        &ca.trust(),
        Some(&ca.client("atoll://default/sdk/hz-a/bank-1")),
    )
    .expect("client tls");
    let channels = Transport::with_tls(tls).channels(Default::default());
    let channel = channels.to(&server.url).expect("channel");
    let request = http::Request::builder()
        .uri(format!("{}/whoami", server.url))
        .body(tonic::body::Body::empty())
        .expect("request");
    let answer = channel.oneshot(request).await.expect("answer");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.version(), http::Version::HTTP_2);
    let body = http_body_util::BodyExt::collect(answer.into_body())
        .await
        .expect("body")
        .to_bytes();
    let value: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(value["id"], "atoll://default/sdk/hz-a/bank-1");
    server.stop().await;
}

/// A TLS handshake (and one HTTP/1.1 request) to `url`'s port with a peer
/// configuration that expects `expected` on the other side.
async fn peer_call(
    client: &ClientTls,
    port: u16,
    expected: &'static str,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let check: atoll_transport::PeerCheck = std::sync::Arc::new(move |der| {
        let (_, certificate) =
            x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        let names = certificate
            .subject_alternative_name()
            .map_err(|e| e.to_string())?
            .ok_or("no SAN")?;
        let found = names.value.general_names.iter().any(
            |n| matches!(n, x509_parser::extensions::GeneralName::URI(uri) if *uri == expected),
        );
        if found {
            Ok(())
        } else {
            Err(format!("not {expected}"))
        }
    });
    let connector =
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(client.peer_config(check)));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"GET /whoami HTTP/1.1\r\nhost: peer\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    tls.read_to_string(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    Ok(answer)
}

#[tokio::test]
async fn peers_check_each_other_by_identity_and_a_mutual_server_refuses_a_client_without_a_certificate()
 {
    let ca = Ca::new("atoll test root");
    let other = Ca::new("somebody else");
    // A node's certificate names no host: only its identity.
    let gateway_b = ca.client("atoll://default/gateway/hz-b/gw-hz-b");
    let server = Server::start(Some(
        ServerTls::mutual(&gateway_b, &ca.trust()).expect("server tls"),
    ))
    .await;
    let port = server.port();

    let gateway_a = ClientTls::new(
        &ca.trust(),
        Some(&ca.client("atoll://default/gateway/hz-a/gw-hz-a")),
    )
    .expect("client tls");
    // The expected peer answers, and saw who called.
    let answer = peer_call(&gateway_a, port, "atoll://default/gateway/hz-b/gw-hz-b")
        .await
        .expect("served");
    assert!(
        answer.contains("atoll://default/gateway/hz-a/gw-hz-a"),
        "{answer}"
    );
    // Another identity than the one expected there: refused by the client.
    let error = peer_call(&gateway_a, port, "atoll://default/gateway/hz-b/gw-other")
        .await
        .expect_err("another gateway");
    assert!(
        error.contains("not atoll://default/gateway/hz-b/gw-other"),
        "{error}"
    );
    // A client without a certificate, or with another CA's: refused by the
    // server at the handshake.
    let anonymous = ClientTls::new(&ca.trust(), None).expect("client tls");
    let error = peer_call(&anonymous, port, "atoll://default/gateway/hz-b/gw-hz-b")
        .await
        .expect_err("no certificate");
    assert!(!error.is_empty());
    let stranger = ClientTls::new(
        &ca.trust(),
        Some(&other.client("atoll://default/gateway/hz-a/gw-hz-a")),
    )
    .expect("client tls");
    peer_call(&stranger, port, "atoll://default/gateway/hz-b/gw-hz-b")
        .await
        .expect_err("another CA");
    // A server of another CA is not a peer, whatever it is called.
    let impostor = Server::start(Some(
        ServerTls::mutual(
            &other.client("atoll://default/gateway/hz-b/gw-hz-b"),
            &ca.trust(),
        )
        .expect("server tls"),
    ))
    .await;
    let impostor_port = impostor.port();
    peer_call(
        &gateway_a,
        impostor_port,
        "atoll://default/gateway/hz-b/gw-hz-b",
    )
    .await
    .expect_err("another CA's server");
    impostor.stop().await;
    server.stop().await;
}
