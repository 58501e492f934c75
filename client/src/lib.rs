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
