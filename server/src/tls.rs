//! TLS for lockd's gRPC port: the server certificate, optional client-certificate checks
//! (mutual TLS), and the listener that runs each handshake on its own task.
//!
//! The certificate files are read at start and again on SIGHUP ([`Tls::reload`]); new
//! connections use the new files, open ones keep theirs. A handshake that fails, or takes longer
//! than [`HANDSHAKE_TIMEOUT`], closes that connection and is logged at debug; it never holds up
//! other clients.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::TcpIncoming;

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; connections beyond them wait in the kernel's backlog.
const HANDSHAKES_IN_FLIGHT: usize = 256;

/// Where the certificate files are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CAs for client certificates (PEM): mutual TLS when set.
    pub client_ca: Option<PathBuf>,
}

/// The TLS settings in force, reloaded on SIGHUP. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Tls {
    files: TlsFiles,
    config: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

impl Tls {
    /// Reads the certificate files.
    ///
    /// # Errors
    /// A file cannot be read, holds no certificate or key, or the key does not match.
    pub fn load(files: TlsFiles) -> Result<Self, String> {
        let config = server_config(&files)?;
        Ok(Self {
            files,
            config: Arc::new(RwLock::new(config)),
        })
    }

    /// Reads the files again; new connections use them. On an error the settings in force
    /// stay.
    ///
    /// # Errors
    /// As [`Tls::load`].
    pub fn reload(&self) -> Result<(), String> {
        let config = server_config(&self.files)?;
        match self.config.write() {
            Ok(mut current) => *current = config,
            // A writer panicked mid-assignment: the value is still a whole Arc; replace it.
            Err(poisoned) => *poisoned.into_inner() = config,
        }
        Ok(())
    }

    /// Whether clients must show a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// The TLS connections made over `tcp`, each handshake on its own task.
    pub fn incoming(
        self,
        tcp: TcpIncoming,
    ) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + Send + 'static {
        tcp.filter_map(|accepted| async move { accepted.ok() })
            .map(move |stream| {
                let acceptor = self.acceptor();
                async move {
                    let peer = stream.peer_addr().ok();
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => Some(tls),
                        Ok(Err(e)) => {
                            tracing::debug!(?peer, error = %e, "TLS handshake failed");
                            None
                        }
                        Err(_) => {
                            tracing::debug!(?peer, "TLS handshake timed out");
                            None
                        }
                    }
                }
            })
            .buffer_unordered(HANDSHAKES_IN_FLIGHT)
            .filter_map(|tls| async move { tls.map(Ok) })
    }
}

fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        format!(
            "LOCKD_TLS_KEY {}: no private key ({e})",
            files.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("LOCKD_TLS_CLIENT_CA {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("LOCKD_TLS_CLIENT_CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "LOCKD_TLS_CERT {} and LOCKD_TLS_KEY {}: {e}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("{}: cannot read certificates ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}
