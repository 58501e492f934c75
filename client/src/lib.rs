//! Rust client for lockd, the gRPC lock service.
//!
//! This crate re-exports the generated `lockd.v1` types and client, and adds [`connect`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use lockd_client::proto::AcquireRequest;
//!
//! let mut client = lockd_client::connect("http://127.0.0.1:50051").await?;
//! let reply = client
//!     .acquire(AcquireRequest { resource: "schedule-123".into(), ..Default::default() })
//!     .await?
//!     .into_inner();
//! if let Some(lease) = reply.lease {
//!     // ... run the job, then release with lease.token ...
//!     # let _ = lease;
//! }
//! # Ok(())
//! # }
//! ```

/// The generated `lockd.v1` messages and the `LockServiceClient`.
pub mod proto {
    pub use lockd_proto::v1::lock_service_client::LockServiceClient;
    pub use lockd_proto::v1::*;
}

/// The generated client over a tonic channel.
pub type Client = proto::LockServiceClient<tonic::transport::Channel>;

/// Connects to the lockd server at `endpoint` (such as `http://127.0.0.1:50051`).
///
/// # Errors
/// Fails when the endpoint is not a valid URI or the connection cannot be made.
pub async fn connect(endpoint: impl Into<String>) -> Result<Client, tonic::transport::Error> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.into())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await?;
    Ok(proto::LockServiceClient::new(channel))
}
