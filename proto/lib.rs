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

/// lockd's gRPC codec: prost, with 1 KiB starting buffers instead of tonic's 8 KiB.
///
/// lockd's messages are small, and a server holds one encode buffer per open call and one
/// decode buffer per streaming request: with 10,000 parked waiters or open streams, 8 KiB each
/// is most of the server's memory. Buffers still grow for larger messages (ListLocks pages).
#[derive(Debug)]
pub struct Codec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

/// Starting size of encode and decode buffers.
const BUFFER_SIZE: usize = 1024;
/// Encoded bytes after which a streaming encoder yields (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(tonic::codec::BufferSettings::new(
            BUFFER_SIZE,
            YIELD_THRESHOLD,
        ))
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(tonic_prost::ProstDecoder::new(
            tonic::codec::BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD),
        ))
    }
}

/// prost's decoder, with its failures answered `INVALID_ARGUMENT` instead of `INTERNAL`.
///
/// A message that is not valid protobuf for its type (a string field that is not UTF-8, a
/// truncated field, a wrong wire type) is bad input from the peer, not a fault of the receiver.
/// The message keeps prost's text, which names the message and the field, such as
/// `failed to decode Protobuf message: AcquireRequest.resource: invalid string value: data is
/// not UTF-8 encoded`.
#[derive(Debug)]
pub struct Decoder<U>(tonic_prost::ProstDecoder<U>);

impl<U: prost::Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<U>, tonic::Status> {
        self.0
            .decode(buf)
            .map_err(|e| tonic::Status::invalid_argument(e.message().to_owned()))
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}
