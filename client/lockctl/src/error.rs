//! lockctl's one error type, and its exit codes: the documented contract for scripts.

use std::process::ExitCode;

/// Exit codes. `run` passes its command's own code through, so these sit where common
/// commands rarely exit (the BSD `sysexits.h` range), except 1 and 2, which mean what they
/// mean for most tools.
pub mod code {
    /// Success.
    pub const OK: u8 = 0;
    /// A definite "no": `release` found the lock not held by the token, `health` found lockd
    /// not serving.
    pub const NO: u8 = 1;
    /// Usage error, or lockd refused the request as invalid (`INVALID_ARGUMENT`).
    pub const USAGE: u8 = 2;
    /// lockd could not be reached or answered `UNAVAILABLE` (its Redis is down), or did not
    /// answer in time (sysexits `EX_UNAVAILABLE`).
    pub const UNAVAILABLE: u8 = 69;
    /// lockd answered with another error (sysexits `EX_SOFTWARE`).
    pub const SOFTWARE: u8 = 70;
    /// The lock is busy: `acquire` or `run` did not get it within `--wait` (sysexits
    /// `EX_TEMPFAIL`: try again later).
    pub const BUSY: u8 = 75;
    /// `run`: the lock was lost while the command ran, so the command was stopped.
    pub const LOST: u8 = 76;
    /// `run`: the command was found but could not be executed (as shells report it).
    pub const CANNOT_EXECUTE: u8 = 126;
    /// `run`: the command was not found (as shells report it).
    pub const NOT_FOUND: u8 = 127;
}

/// Why a lockctl command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag or argument that cannot work (a file that cannot be read, say).
    #[error("{0}")]
    Usage(String),
    /// A call to lockd failed.
    #[error(transparent)]
    Lockd(#[from] lockd_client::Error),
    /// A local operation failed (starting or stopping the command, writing output).
    #[error("{0}")]
    Io(String),
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Self::Lockd(status.into())
    }
}

impl Error {
    /// The exit code this error ends lockctl with.
    pub fn exit_code(&self) -> u8 {
        use lockd_client::Error as E;
        match self {
            Self::Usage(_) | Self::Lockd(E::InvalidArgument(_)) => code::USAGE,
            Self::Lockd(E::Connect(_) | E::Unavailable(_) | E::Timeout(_)) => code::UNAVAILABLE,
            Self::Lockd(_) | Self::Io(_) => code::SOFTWARE,
        }
    }

    /// Prints the error and returns its exit code.
    pub fn report(&self) -> ExitCode {
        // The client's Connect error hides its cause in the source chain: show it.
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !message.contains(&cause_text) {
                message = format!("{message}: {cause_text}");
            }
            source = cause.source();
        }
        eprintln!("lockctl: {message}");
        ExitCode::from(self.exit_code())
    }
}
