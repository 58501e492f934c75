//! Compiles the few etcd messages and services the etcd target calls (proto/), with protox.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["etcd.proto", "v3lock.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
