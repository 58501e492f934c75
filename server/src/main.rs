//! The `lockd` binary: parse the configuration, start logging, serve until SIGINT/SIGTERM.

use std::process::ExitCode;

use clap::Parser as _;

#[tokio::main]
async fn main() -> ExitCode {
    let config = lockd::Config::parse();
    lockd::telemetry::init(config.log_format);
    match lockd::run(config, lockd::shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "lockd stopped");
            ExitCode::FAILURE
        }
    }
}
