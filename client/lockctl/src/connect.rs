//! The connection to lockd: endpoint, TLS, and the API key on every call.

use lockd_client::proto::LockServiceClient;
use lockd_client::{ApiKey, LockClient};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_client::HealthClient;

use crate::cli::{Cli, TlsArgs};
use crate::error::Error;

/// The generated lockd client, sending the API key.
pub type Lockd = LockServiceClient<InterceptedService<Channel, ApiKey>>;

/// An open connection to lockd.
pub struct Connection {
    /// The HTTP/2 connection, shared by every client made from it.
    pub channel: Channel,
    api_key: ApiKey,
    /// The key as given, for [`Connection::lock_client`].
    key: Option<String>,
}

impl Connection {
    /// Connects to `cli.endpoint`, with TLS for an https:// endpoint.
    ///
    /// # Errors
    /// [`Error::Usage`] for an unreadable certificate or a key that is not a header value;
    /// a connect error when lockd cannot be reached.
    pub async fn open(cli: &Cli) -> Result<Self, Error> {
        let api_key = match &cli.api_key {
            Some(key) => ApiKey::new(key).map_err(|_| {
                Error::Usage("the API key has characters a header cannot carry".into())
            })?,
            None => ApiKey::default(),
        };
        let mut endpoint = Endpoint::from_shared(cli.endpoint.clone())
            .map_err(lockd_client::Error::from)?
            .connect_timeout(lockd_client::DEFAULT_CONNECT_TIMEOUT)
            .timeout(cli.timeout)
            .tcp_nodelay(true);
        if cli.endpoint.starts_with("https://") {
            endpoint = endpoint
                .tls_config(tls_config(&cli.tls)?)
                .map_err(lockd_client::Error::from)?;
        } else if cli.tls.ca_cert.is_some() || cli.tls.cert.is_some() {
            return Err(Error::Usage("TLS options need an https:// endpoint".into()));
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(lockd_client::Error::from)?;
        Ok(Self {
            channel,
            api_key,
            key: cli.api_key.clone(),
        })
    }

    /// The high-level client (lock guards with renewal) over this connection, with the key.
    ///
    /// # Errors
    /// As [`Connection::open`] for the key (checked there already).
    pub fn lock_client(&self) -> Result<LockClient, Error> {
        let mut builder = LockClient::builder(String::new());
        if let Some(key) = &self.key {
            builder = builder.api_key(key);
        }
        Ok(builder.on_channel(self.channel.clone())?)
    }

    /// The lockd client over this connection.
    pub fn lockd(&self) -> Lockd {
        LockServiceClient::with_interceptor(self.channel.clone(), self.api_key.clone())
    }

    /// The standard health client over this connection.
    pub fn health(&self) -> HealthClient<InterceptedService<Channel, ApiKey>> {
        HealthClient::with_interceptor(self.channel.clone(), self.api_key.clone())
    }
}

/// The TLS settings from the flags.
fn tls_config(args: &TlsArgs) -> Result<ClientTlsConfig, Error> {
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| Error::Usage(format!("cannot read {}: {e}", path.display())))
    };
    let mut tls = ClientTlsConfig::new();
    tls = match &args.ca_cert {
        Some(path) => tls.ca_certificate(Certificate::from_pem(read(path)?)),
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(domain) = &args.tls_domain {
        tls = tls.domain_name(domain);
    }
    Ok(tls)
}
