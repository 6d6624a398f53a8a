//! gRPC channels to the control plane's config stream service, over plain
//! HTTP/2 for `http://` URLs and TLS (ALPN `h2`) for `https://` URLs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use parking_lot::Mutex;
use tonic::transport::{Channel, Endpoint};

use crate::tls::ClientTls;

/// How a channel behaves. Every field left `None` keeps tonic's default.
#[derive(Clone, Debug, Default)]
pub struct ChannelOptions {
    /// How long a connection may take.
    pub connect_timeout: Option<Duration>,
    /// How long each call may take.
    pub timeout: Option<Duration>,
    /// HTTP/2 pings every this long, and how long to wait for the answer:
    /// a silent peer is noticed in that time.
    pub keepalive: Option<(Duration, Duration)>,
}

/// Makes gRPC channels with this process's TLS material. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Channels {
    tls: Option<ClientTls>,
    cache: Arc<Mutex<HashMap<String, Channel>>>,
    options: ChannelOptions,
}

impl Channels {
    /// Channels with `tls` for `https://` URLs (none: they are refused),
    /// made with `options`.
    pub fn new(tls: Option<ClientTls>, options: ChannelOptions) -> Self {
        Self {
            tls,
            cache: Arc::default(),
            options,
        }
    }

    /// The same TLS material and cache policy with other options (and a
    /// cache of their own).
    pub fn with_options(&self, options: ChannelOptions) -> Self {
        Self::new(self.tls.clone(), options)
    }

    /// A new channel to `url`, connected now.
    pub async fn connect(&self, url: &str) -> Result<Channel, String> {
        let (endpoint, https) = self.endpoint(url)?;
        let connected = match https {
            Some(https) => endpoint.connect_with_connector(https).await,
            None => endpoint.connect().await,
        };
        connected.map_err(|e| crate::http::cause(&e))
    }

    /// A new channel to `url`, connecting on first use.
    pub fn connect_lazy(&self, url: &str) -> Result<Channel, String> {
        let (endpoint, https) = self.endpoint(url)?;
        Ok(match https {
            Some(https) => endpoint.connect_with_connector_lazy(https),
            None => endpoint.connect_lazy(),
        })
    }

    fn endpoint(
        &self,
        url: &str,
    ) -> Result<
        (
            Endpoint,
            Option<hyper_rustls::HttpsConnector<HttpConnector>>,
        ),
        String,
    > {
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| format!("bad control plane URL {url}: {e}"))?
            .tcp_nodelay(true);
        if let Some(timeout) = self.options.connect_timeout {
            endpoint = endpoint.connect_timeout(timeout);
        }
        if let Some(timeout) = self.options.timeout {
            endpoint = endpoint.timeout(timeout);
        }
        if let Some((every, within)) = self.options.keepalive {
            endpoint = endpoint
                .http2_keep_alive_interval(every)
                .keep_alive_timeout(within);
        }
        if !url.starts_with("https://") {
            return Ok((endpoint, None));
        }
        let Some(tls) = &self.tls else {
            return Err(crate::http::no_ca_bundle(url));
        };
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        if let Some(timeout) = self.options.connect_timeout {
            http.set_connect_timeout(Some(timeout));
        }
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.config())
            .https_only()
            .enable_http2()
            .wrap_connector(http);
        Ok((endpoint, Some(https)))
    }

    /// A channel to `url`, made once and shared by every caller after.
    pub fn to(&self, url: &str) -> Result<Channel, String> {
        let mut cache = self.cache.lock();
        if let Some(channel) = cache.get(url) {
            return Ok(channel.clone());
        }
        let channel = self.connect_lazy(url)?;
        cache.insert(url.to_owned(), channel.clone());
        Ok(channel)
    }
}
