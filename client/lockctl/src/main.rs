//! `lockctl`: the operator's command line for lockd, built on `lockd-client`.
//!
//! Modules: `cli` (the clap struct: flags, environment, exit codes in `--help`), `connect`
//! (endpoint, TLS, API key), `commands` (list, get, watch, acquire, release, health), `run`
//! (a command under a lock), `output` (tables and JSON), `error` (the error type and exit
//! codes).

mod cli;
mod commands;
mod connect;
mod error;
mod output;
mod run;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::commands::Context;
use crate::connect::Connection;
use crate::error::Error;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(error) => error.report(),
    }
}

/// Connects, then runs the command.
async fn dispatch(cli: Cli) -> Result<u8, Error> {
    let ctx = Context {
        conn: Connection::open(&cli).await?,
        json: cli.json,
        timeout: cli.timeout,
    };
    match cli.command {
        Command::List { prefix } => commands::list(&ctx, prefix).await,
        Command::Get { resource } => commands::get(&ctx, resource).await,
        Command::Watch { prefix } => commands::watch(&ctx, prefix).await,
        Command::Acquire { resource, lock } => commands::acquire(&ctx, resource, lock).await,
        Command::Release {
            resource,
            token,
            min_hold,
        } => commands::release(&ctx, resource, token, min_hold).await,
        Command::Health => commands::health(&ctx).await,
        Command::Run {
            resource,
            lock,
            min_hold,
            grace,
            command,
        } => {
            let run = run::Run {
                resource,
                lock,
                min_hold,
                grace,
                command,
            };
            run::run(&ctx, run).await
        }
    }
}
