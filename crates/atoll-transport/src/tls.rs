//! TLS material that can be replaced while connections stay open.
//!
//! A [`ClientTls`] or [`ServerTls`] is built once and handed to every
//! connection; its certificate and the roots it trusts live behind an
//! atomic swap, so a renewed certificate or a new set of roots takes effect
//! at the next handshake and connections already open are left alone.
//! Cryptography is rustls with ring, as everywhere else in Atoll.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// What is wrong with TLS material, in words that say which file or
/// value and what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain (leaf first) and its private key: what a node or a
/// server presents.
#[derive(Clone)]
pub struct Identity {
    key: Arc<CertifiedKey>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("certificates", &self.key.cert.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// From PEM text: the chain (leaf first, then intermediates) and the
    /// key (PKCS#8, SEC1 or PKCS#1). `what` names them in errors.
    pub fn from_pem(chain: &[u8], key: &[u8], what: &str) -> Result<Self, TlsError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError(format!("the certificate of {what} is not valid PEM: {e}")))?;
        if chain.is_empty() {
            return Err(TlsError(format!(
                "the certificate of {what} holds no CERTIFICATE block"
            )));
        }
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| TlsError(format!("the private key of {what} is not valid PEM: {e}")))?;
        let signing = provider().key_provider.load_private_key(key).map_err(|e| {
            TlsError(format!(
                "the private key of {what} cannot sign (an RSA, ECDSA or Ed25519 key is needed): {e}"
            ))
        })?;
        let key = CertifiedKey::new(chain, signing);
        key.keys_match().map_err(|e| {
            TlsError(format!(
                "the certificate and the private key of {what} do not belong together: {e}"
            ))
        })?;
        Ok(Self { key: Arc::new(key) })
    }

    /// From a PEM chain file and a PEM key file.
    pub fn from_files(chain: &Path, key: &Path) -> Result<Self, TlsError> {
        let chain_pem = std::fs::read(chain)
            .map_err(|e| TlsError(format!("cannot read certificate {}: {e}", chain.display())))?;
        let key_pem = std::fs::read(key)
            .map_err(|e| TlsError(format!("cannot read private key {}: {e}", key.display())))?;
        Self::from_pem(
            &chain_pem,
            &key_pem,
            &format!("{} and {}", chain.display(), key.display()),
        )
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.key.cert
    }
}

/// The roots a peer's certificate must chain to.
#[derive(Clone, Debug)]
pub struct Trust {
    roots: Arc<RootCertStore>,
}

impl Trust {
    /// From PEM text holding one or more CA certificates.
    pub fn from_pem(pem: &[u8], what: &str) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        let mut count = 0;
        for certificate in CertificateDer::pem_slice_iter(pem) {
            let certificate = certificate
                .map_err(|e| TlsError(format!("the CA bundle {what} is not valid PEM: {e}")))?;
            roots.add(certificate).map_err(|e| {
                TlsError(format!("a certificate in {what} is not a usable CA: {e}"))
            })?;
            count += 1;
        }
        if count == 0 {
            return Err(TlsError(format!(
                "the CA bundle {what} holds no CERTIFICATE block"
            )));
        }
        Ok(Self {
            roots: Arc::new(roots),
        })
    }

    /// From a PEM file of CA certificates.
    pub fn from_file(path: &Path) -> Result<Self, TlsError> {
        let pem = std::fs::read(path)
            .map_err(|e| TlsError(format!("cannot read CA bundle {}: {e}", path.display())))?;
        Self::from_pem(&pem, &path.display().to_string())
    }

    fn server_verifier(&self) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
        WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError(format!("the CA bundle cannot verify servers: {e}")))
    }

    fn client_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError(format!("the CA bundle cannot verify clients: {e}")))
    }
}

/// The client side: the roots a server must chain to, and the certificate
/// this client presents, if any. Clones share the material.
#[derive(Clone, Debug)]
pub struct ClientTls {
    state: Arc<ClientState>,
}

#[derive(Debug)]
struct ClientState {
    identity: ArcSwapOption<CertifiedKey>,
    verifier: ArcSwap<WebPkiServerVerifier>,
    /// The same roots, for peers checked by identity instead of by name.
    roots: ArcSwap<RootCertStore>,
}

/// Decides whether a peer's certificate (its chain already verified to the
/// roots) is the one expected there: by its identity, since nodes'
/// certificates name no hosts.
pub type PeerCheck = Arc<dyn Fn(&CertificateDer<'_>) -> Result<(), String> + Send + Sync>;

impl ClientTls {
    /// Trusts servers that chain to `trust`, presenting `identity` when a
    /// server asks for a certificate.
    pub fn new(trust: &Trust, identity: Option<&Identity>) -> Result<Self, TlsError> {
        Ok(Self {
            state: Arc::new(ClientState {
                identity: ArcSwapOption::new(identity.map(|i| i.key.clone())),
                verifier: ArcSwap::new(trust.server_verifier()?),
                roots: ArcSwap::new(trust.roots.clone()),
            }),
        })
    }

    /// From now on, handshakes present `identity` (a renewed certificate);
    /// connections already open keep theirs.
    pub fn set_identity(&self, identity: &Identity) {
        self.state.identity.store(Some(identity.key.clone()));
    }

    /// From now on, servers must chain to `trust`.
    pub fn set_trust(&self, trust: &Trust) -> Result<(), TlsError> {
        self.state.verifier.store(trust.server_verifier()?);
        self.state.roots.store(trust.roots.clone());
        Ok(())
    }

    /// Whether a certificate is presented.
    pub fn has_identity(&self) -> bool {
        self.state.identity.load().is_some()
    }

    /// A rustls configuration that reads the current material at every
    /// handshake (no ALPN: the connector offers what it speaks).
    pub fn config(&self) -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"))
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CurrentServerVerifier(self.state.clone())))
            .with_client_cert_resolver(Arc::new(CurrentClientCert(self.state.clone())))
    }

    /// A rustls configuration for another node rather than the control
    /// plane (a gateway forwarding to a gateway): the server's chain must
    /// reach the trusted roots for server use, its name is not checked
    /// (nodes' certificates name no hosts), and `check` decides on its
    /// identity. Presents this client's current certificate.
    pub fn peer_config(&self, check: PeerCheck) -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"))
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerServerVerifier {
                state: self.state.clone(),
                check,
            }))
            .with_client_cert_resolver(Arc::new(CurrentClientCert(self.state.clone())))
    }
}

/// Verifies a peer node's server certificate: chain and usage by WebPKI,
/// identity by the caller's check; signatures as the current verifier
/// does.
struct PeerServerVerifier {
    state: Arc<ClientState>,
    check: PeerCheck,
}

impl fmt::Debug for PeerServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PeerServerVerifier")
    }
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.state.roots.load(),
            intermediates,
            now,
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
        )?;
        (self.check)(end_entity).map_err(rustls::Error::General)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.state
            .verifier
            .load()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.state
            .verifier
            .load()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.state.verifier.load().supported_verify_schemes()
    }
}

#[derive(Debug)]
struct CurrentClientCert(Arc<ClientState>);

impl rustls::client::ResolvesClientCert for CurrentClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.identity.load_full()
    }

    fn has_certs(&self) -> bool {
        self.0.identity.load().is_some()
    }
}

#[derive(Debug)]
struct CurrentServerVerifier(Arc<ClientState>);

impl ServerCertVerifier for CurrentServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.verifier.load().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .verifier
            .load()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .verifier
            .load()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.verifier.load().supported_verify_schemes()
    }
}

/// The server side: the certificate this server presents, and the roots a
/// client certificate must chain to when a client presents one (a client
/// without a certificate is let through the handshake; what it may do is
/// decided per request). Clones share the material.
#[derive(Clone, Debug)]
pub struct ServerTls {
    state: Arc<ServerState>,
}

#[derive(Debug)]
struct ServerState {
    identity: ArcSwap<CertifiedKey>,
    clients: ArcSwapOption<ClientVerifier>,
    /// Whether a client without a certificate is refused at the handshake.
    mandatory: bool,
}

#[derive(Debug)]
struct ClientVerifier(Arc<dyn ClientCertVerifier>);

impl ServerTls {
    /// Presents `identity`; verifies client certificates against
    /// `clients` (none: client certificates are not asked for).
    pub fn new(identity: &Identity, clients: Option<&Trust>) -> Result<Self, TlsError> {
        let clients = match clients {
            Some(trust) => Some(Arc::new(ClientVerifier(trust.client_verifier()?))),
            None => None,
        };
        Ok(Self {
            state: Arc::new(ServerState {
                identity: ArcSwap::new(identity.key.clone()),
                clients: ArcSwapOption::new(clients),
                mandatory: false,
            }),
        })
    }

    /// Presents `identity` and refuses, at the handshake, every client
    /// without a certificate that chains to `clients` (a listener for
    /// other nodes only).
    pub fn mutual(identity: &Identity, clients: &Trust) -> Result<Self, TlsError> {
        Ok(Self {
            state: Arc::new(ServerState {
                identity: ArcSwap::new(identity.key.clone()),
                clients: ArcSwapOption::new(Some(Arc::new(ClientVerifier(
                    clients.client_verifier()?,
                )))),
                mandatory: true,
            }),
        })
    }

    /// From now on, handshakes present `identity`.
    pub fn set_identity(&self, identity: &Identity) {
        self.state.identity.store(identity.key.clone());
    }

    /// From now on, client certificates must chain to `trust`.
    pub fn set_client_trust(&self, trust: &Trust) -> Result<(), TlsError> {
        self.state
            .clients
            .store(Some(Arc::new(ClientVerifier(trust.client_verifier()?))));
        Ok(())
    }

    /// A rustls configuration that reads the current material at every
    /// handshake; ALPN offers HTTP/2 and HTTP/1.1.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"));
        let builder = if self.state.clients.load().is_some() {
            builder.with_client_cert_verifier(Arc::new(CurrentClientVerifier(self.state.clone())))
        } else {
            builder.with_no_client_auth()
        };
        let mut config =
            builder.with_cert_resolver(Arc::new(CurrentServerCert(self.state.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

#[derive(Debug)]
struct CurrentServerCert(Arc<ServerState>);

impl ResolvesServerCert for CurrentServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.identity.load_full())
    }
}

#[derive(Debug)]
struct CurrentClientVerifier(Arc<ServerState>);

impl CurrentClientVerifier {
    fn with<T>(
        &self,
        f: impl FnOnce(&dyn ClientCertVerifier) -> Result<T, rustls::Error>,
    ) -> Result<T, rustls::Error> {
        match &*self.0.clients.load() {
            Some(verifier) => f(verifier.0.as_ref()),
            None => Err(rustls::Error::General(
                "client certificates are not accepted here".into(),
            )),
        }
    }
}

impl ClientCertVerifier for CurrentClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a client sends the one certificate it has.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.with(|v| v.verify_client_cert(end_entity, intermediates, now))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.with(|v| v.verify_tls12_signature(message, cert, dss))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.with(|v| v.verify_tls13_signature(message, cert, dss))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
