//! The serving loop of an axum app on one port, plain or TLS, with the
//! peer of each connection handed to every request.
//!
//! Each request carries a [`Peer`] extension (the remote address and the
//! client certificate chain the handshake verified, if the client sent one)
//! and axum's `ConnectInfo<SocketAddr>`. Identity is taken from there, never
//! from what a client writes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use crate::tls::ServerTls;

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Who is at the other end of a request's connection.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The remote address.
    pub remote: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The client certificate chain (leaf first) the TLS handshake
    /// verified; `None` over plain HTTP or when the client sent none.
    pub certificates: Option<Arc<[CertificateDer<'static>]>>,
}

/// Serves `app` on `listener` until `shutdown` completes, then stops
/// accepting and waits for the connections open to finish their requests
/// (the caller bounds that wait). With `tls`, every connection is TLS.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pass, and try
                    // again in a moment rather than spin.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // No TCP_NODELAY, as axum::serve: with it, 200 nodes on the config
        // stream raised propagation p99 by about 40% (docs/benchmarks.md).
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => {
                    let service = service(
                        app,
                        Peer {
                            remote,
                            tls: false,
                            certificates: None,
                        },
                    );
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    if let Err(error) = watcher.watch(connection).await {
                        tracing::debug!(%remote, %error, "connection ended with an error");
                    }
                }
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
                    let stream =
                        match tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(error)) => {
                                tracing::info!(%remote, %error, "TLS handshake refused");
                                return;
                            }
                            Err(_) => {
                                tracing::info!(%remote, "TLS handshake not finished within 10 s");
                                return;
                            }
                        };
                    let certificates = stream.get_ref().1.peer_certificates().map(|chain| {
                        chain
                            .iter()
                            .map(|c| c.clone().into_owned())
                            .collect::<Vec<_>>()
                            .into()
                    });
                    let service = service(
                        app,
                        Peer {
                            remote,
                            tls: true,
                            certificates,
                        },
                    );
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    if let Err(error) = watcher.watch(connection).await {
                        tracing::debug!(%remote, %error, "connection ended with an error");
                    }
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

fn service(
    app: Router,
    peer: Peer,
) -> impl hyper::service::Service<
    http::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer.remote));
        request.extensions_mut().insert(peer.clone());
        app.clone().oneshot(request.map(axum::body::Body::new))
    })
}
