//! Accepting connections: plain TCP (HTTP/1.1 and h2c) or TLS (ALPN h2 and
//! http/1.1), one task per connection, graceful drain on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::Proxy;
use crate::fast::{self, Exit};
use crate::handler::Connection;
use crate::rewind::Rewind;

/// TLS settings of a listener.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    /// For a peer listener: the workspace whose gateways may connect.
    peer: Option<String>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

impl Tls {
    /// Loads a PEM certificate chain and private key; offers h2 and
    /// http/1.1 by ALPN.
    pub fn from_files(certificate: &Path, private_key: &Path) -> Result<Self, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certificate)
            .map_err(|e| format!("cannot read certificate {}: {e}", certificate.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| {
                format!(
                    "certificate {} is not valid PEM: {e}",
                    certificate.display()
                )
            })?;
        if chain.is_empty() {
            return Err(format!("{} holds no certificate", certificate.display()));
        }
        let key = PrivateKeyDer::from_pem_file(private_key)
            .map_err(|e| format!("cannot read private key {}: {e}", private_key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| {
                format!(
                    "certificate {} and key {} do not work together: {e}",
                    certificate.display(),
                    private_key.display()
                )
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            peer: None,
        })
    }

    /// A peer listener's TLS: `server` presents the node's certificate and
    /// requires a client certificate of the CA; after the handshake only a
    /// `gateway` of `workspace` is served.
    pub fn peer(server: &atoll_transport::ServerTls, workspace: &str) -> Self {
        let workspace = if workspace.is_empty() {
            atoll_model::DEFAULT_WORKSPACE
        } else {
            workspace
        };
        Self {
            acceptor: TlsAcceptor::from(server.config()),
            peer: Some(workspace.to_owned()),
        }
    }
}

/// Whether a peer listener's client is a gateway of `workspace`, by the
/// certificate it presented (its chain was verified at the handshake).
fn peer_allowed(
    stream: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    workspace: &str,
) -> Result<(), String> {
    let certificate = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("it presented no certificate")?;
    let id = atoll_identity::id_of_certificate(certificate)?;
    if id.role != atoll_identity::Role::Gateway || id.workspace != workspace {
        return Err(format!(
            "{id} is not a gateway of workspace {workspace}; only gateways forward here"
        ));
    }
    Ok(())
}

/// A bound listener.
#[derive(Debug)]
pub struct Listener {
    /// The socket.
    pub socket: TcpListener,
    /// TLS, for https listeners.
    pub tls: Option<Tls>,
}

impl Listener {
    /// Binds `address`, with a message that names the address when it fails.
    pub async fn bind(address: SocketAddr, tls: Option<Tls>) -> Result<Self, String> {
        let socket = TcpListener::bind(address).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                format!("cannot listen on {address}: the port is in use")
            } else {
                format!("cannot listen on {address}: {e}")
            }
        })?;
        Ok(Self { socket, tls })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

/// Serves `listener` with `proxy` until `shutdown` turns true, then stops
/// accepting and lets open connections finish their requests for up to
/// `drain`.
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: Listener,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(64 * 1024)
        // As many as the fast path parses; the handler applies the limit
        // on the client's own headers (MAX_CLIENT_HEADERS) on every path.
        .max_headers(crate::headers::MAX_PARSED_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    let tls = listener.tls.clone();
    let fast_connections = Arc::new(FastConnections::default());
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.socket.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let stopping = shutdown.clone();
        let fast = fast_connections.clone();
        tokio::spawn(async move {
            let connection = Connection {
                remote,
                tls: tls.is_some(),
                peer: tls.as_ref().is_some_and(|t| t.peer.is_some()),
            };
            proxy.metrics.connections.inc();
            let handler = proxy.clone();
            let service = service_fn(move |request| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler.handle(request, connection).await) }
            });
            let result = match tls {
                None => {
                    // HTTP/1.1 takes the fast path; what it does not handle
                    // goes to hyper with the bytes already read.
                    let guard = fast.enter();
                    let exit = fast::serve(&proxy, stream, remote, &stopping).await;
                    drop(guard);
                    match exit {
                        Exit::Closed => Ok(()),
                        Exit::Handoff(stream, buffer) => {
                            let io = Rewind::new(buffer.freeze(), stream);
                            let conn =
                                builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                            watcher.watch(conn.into_owned()).await
                        }
                    }
                }
                Some(tls) => {
                    match tokio::time::timeout(Duration::from_secs(10), tls.acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(stream)) => {
                            if let Some(workspace) = &tls.peer
                                && let Err(why) = peer_allowed(&stream, workspace)
                            {
                                tracing::warn!(%remote, reason = %why, "refused a connection on the peer listener");
                                proxy.metrics.peer_refused.inc();
                                proxy.metrics.connections.dec();
                                return;
                            }
                            let conn = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service);
                            watcher.watch(conn.into_owned()).await
                        }
                        Ok(Err(error)) => {
                            if tls.peer.is_some() {
                                // Someone without a certificate of the CA:
                                // counted; logged at debug, since anyone who
                                // reaches the port can cause it.
                                tracing::debug!(%remote, %error, "refused a connection on the peer listener: the TLS handshake failed");
                                proxy.metrics.peer_refused.inc();
                            } else {
                                tracing::debug!(%remote, %error, "TLS handshake failed");
                            }
                            Ok(())
                        }
                        Err(_) => Ok(()),
                    }
                }
            };
            if let Err(error) = result {
                tracing::debug!(%remote, %error, "connection ended with an error");
            }
            proxy.metrics.connections.dec();
        });
    }
    drop(listener);
    let drained = async {
        graceful.shutdown().await;
        fast_connections.idle().await;
    };
    if tokio::time::timeout(drain, drained).await.is_err() {
        tracing::warn!(
            ?drain,
            "connections still open after the drain timeout; closing them"
        );
    }
}

/// Counts fast-path connections so that a stop can wait for them.
#[derive(Debug, Default)]
struct FastConnections {
    open: std::sync::atomic::AtomicUsize,
    closed: tokio::sync::Notify,
}

struct FastGuard(Arc<FastConnections>);

impl FastConnections {
    fn enter(self: &Arc<Self>) -> FastGuard {
        self.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        FastGuard(self.clone())
    }

    async fn idle(&self) {
        loop {
            let notified = self.closed.notified();
            if self.open.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for FastGuard {
    fn drop(&mut self) {
        if self
            .0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            self.0.closed.notify_waiters();
        }
    }
}
