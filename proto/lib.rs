//! The wire contract of lockd: the `lockd.v1` gRPC API compiled from `proto/lockd/v1/lock.proto`.
//!
//! Both the server (`lockd`) and the client (`lockd-client`) use these types, so the proto is
//! compiled once for the whole workspace.

/// Package `lockd.v1`: `LockService` and its messages.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("lockd.v1");

    /// The encoded `FileDescriptorSet` of `lockd.v1` (with its imports), for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lockd_descriptor");
}
