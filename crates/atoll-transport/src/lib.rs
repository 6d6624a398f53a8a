//! Every connection to Atoll's control plane, and between its planes, in
//! one place: so that TLS, client certificates and API tokens go in once.
//!
//! - [`ControlUrls`]: the control-plane replicas a client may use, and
//!   which one it uses now.
//! - [`tls`]: certificates and trusted roots that can be replaced while
//!   connections stay open ([`ClientTls`], [`ServerTls`]).
//! - [`HttpClient`] and [`RestClient`]: the typed client of the REST API,
//!   moving to another replica when one cannot be reached.
//! - [`Channels`]: gRPC channels for the config stream's service.
//! - [`serve`]: the serving loop of a control plane or gateway admin port,
//!   plain or TLS, handing each request its [`Peer`].
//!
//! A client is set up with a [`Transport`]: the TLS material (if any) and
//! the connection timeouts, shared by its REST client and its channels.

mod files;
mod grpc;
mod http;
mod rest;
mod server;
pub mod tls;
mod urls;

use std::time::Duration;

pub use files::TlsFiles;
pub use grpc::{ChannelOptions, Channels};
pub use http::{HttpClient, HttpError, HttpRequest, HttpResponse};
pub use rest::{NOT_LEADER_WAIT, RestClient, RestError, RestResponse, RestStream, USER_HEADER};
pub use server::{Peer, serve};
pub use tls::{ClientTls, Identity, PeerCheck, ServerTls, TlsError, Trust};
pub use urls::ControlUrls;

/// A process's way of reaching the control plane: its TLS material, if it
/// has any. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Transport {
    tls: Option<ClientTls>,
}

impl Transport {
    /// Plain HTTP only (`https://` URLs are refused with a clear error).
    pub fn plain() -> Self {
        Self::default()
    }

    /// With TLS for `https://` URLs.
    pub fn with_tls(tls: ClientTls) -> Self {
        Self { tls: Some(tls) }
    }

    /// The TLS material, for swapping a renewed certificate in.
    pub fn tls(&self) -> Option<&ClientTls> {
        self.tls.as_ref()
    }

    /// An HTTP client whose connections take at most `connect_timeout` to
    /// open.
    pub fn http(&self, connect_timeout: Duration) -> HttpClient {
        HttpClient::new(self.tls.as_ref(), connect_timeout)
    }

    /// A REST client of `urls`, each request given at most `timeout`.
    pub fn rest(&self, urls: ControlUrls, timeout: Option<Duration>) -> RestClient {
        RestClient::new(self.http(Duration::from_secs(5)), urls, timeout)
    }

    /// gRPC channels made with `options`.
    pub fn channels(&self, options: ChannelOptions) -> Channels {
        Channels::new(self.tls.clone(), options)
    }
}
