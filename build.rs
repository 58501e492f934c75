//! Compiles `proto/` once, with protox (no system `protoc` needed): the prost/tonic code for
//! `lockd-proto`, and the encoded descriptor set that the server serves through reflection.
use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // include_imports and source info are on, so reflection shows the proto comments.
    let fds = protox::compile(["lockd/v1/lock.proto"], ["proto"])?;
    std::fs::write(out.join("lockd_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .server_mod_attribute("lockd.v1", "#[cfg(feature = \"server\")]")
        .client_mod_attribute("lockd.v1", "#[cfg(feature = \"client\")]")
        // Small starting buffers: see `Codec` in proto/lib.rs.
        .codec_path("crate::Codec")
        .compile_fds(fds)?;
    // Neither protox nor compile_fds prints this itself.
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
