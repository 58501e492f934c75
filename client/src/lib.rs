#![doc = include_str!("../README.md")]

mod client;
mod error;
mod guard;
mod options;
mod renew;
mod retry;
mod session;
#[cfg(feature = "otel")]
mod trace;

pub use client::{
    ClientBuilder, DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, LockClient, Outcome, TryLock,
};
pub use error::{Error, LostReason};
pub use guard::{LeaseInfo, LockGuard};
pub use options::{DEFAULT_TTL, LockOptions, LockRequest};
pub use proto::LockInfo;
pub use retry::RetryPolicy;

/// The generated `lockd.v1` messages and the `LockServiceClient`.
pub mod proto {
    pub use lockd_proto::v1::lock_service_client::LockServiceClient;
    pub use lockd_proto::v1::*;
}

/// The generated client over a tonic channel (see [`LockClient::raw`] for one that shares a
/// [`LockClient`]'s connection).
pub type Client = proto::LockServiceClient<tonic::transport::Channel>;

/// The generated client as a [`LockClient`] uses it: every call carries its API key.
pub type AuthedClient = proto::LockServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ApiKey>,
>;

/// Adds `authorization: Bearer <key>` to every call, when a key is set
/// ([`ClientBuilder::api_key`]).
#[derive(Clone, Default)]
pub struct ApiKey(Option<tonic::metadata::AsciiMetadataValue>);

impl ApiKey {
    /// The header for `key`.
    ///
    /// # Errors
    /// [`Error::Protocol`] when the key is not printable ASCII.
    pub fn new(key: &str) -> Result<Self, Error> {
        let mut value: tonic::metadata::AsciiMetadataValue = format!("Bearer {key}")
            .parse()
            .map_err(|_| Error::Protocol("the API key must be printable ASCII".into()))?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }
}

/// Never shows the key.
impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ApiKey(***)"
        } else {
            "ApiKey(None)"
        })
    }
}

impl tonic::service::Interceptor for ApiKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Connects the generated client to the lockd server at `endpoint` (such as
/// `http://127.0.0.1:50051`). Most callers want [`LockClient::connect`] instead.
///
/// # Errors
/// Fails when the endpoint is not a valid URI or the connection cannot be made.
pub async fn connect(endpoint: impl Into<String>) -> Result<Client, tonic::transport::Error> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.into())?
        .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await?;
    Ok(proto::LockServiceClient::new(channel))
}
