//! TLS for SMTP: the client side for relays that are not on loopback
//! (STARTTLS, RFC 3207, or implicit TLS, RFC 8314) and the server side for
//! the built-in sink. Both use rustls with the `ring` provider; certificates
//! are checked against the operating system's trust store plus an optional
//! CA file.
//!
//! This module owns building TLS configurations and the connection halves
//! that are either plain TCP or TLS. It knows nothing of SMTP: when to
//! upgrade is the SMTP client's and the sink's business.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsStream;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file could not be read or holds no usable PEM.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// No trust anchor at all: the system store is empty and no CA file was given.
    #[error("no trusted CA certificates: the system store is empty or unreadable ({0}); install ca-certificates or set ca_file")]
    NoRoots(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How a client checks the server's certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Verify {
    /// Extra trust anchors (PEM), added to the system store.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate: encryption without authentication. Only for
    /// test rigs; the name says so.
    pub danger_accept_invalid_certs: bool,
}

/// A client configuration trusting the system store plus `verify.ca_file`.
pub fn client_config(verify: &Verify) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(crypto())
        .with_safe_default_protocol_versions()?;
    let config = if verify.danger_accept_invalid_certs {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(crypto())))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let native_errors = native
            .errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = &verify.ca_file {
            let certs = read_certs(path)?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(file_error(path, "holds no usable CA certificate"));
            }
        }
        if roots.is_empty() {
            return Err(TlsError::NoRoots(if native_errors.is_empty() {
                "no certificates found".into()
            } else {
                native_errors
            }));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// A server configuration from a PEM certificate chain and private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| file_error(key, &format!("no private key: {e}")))?;
    server_from(chain, key)
}

/// A server configuration from PEM text already in memory (tests, demos).
pub fn server_config_pem(cert: &str, key: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let inline = || PathBuf::from("<inline PEM>");
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(&inline(), &e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|e| file_error(&inline(), &format!("no private key: {e}")))?;
    server_from(chain, key)
}

fn server_from(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let config = rustls::ServerConfig::builder_with_provider(crypto())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, &e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, &e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn file_error(path: &Path, message: &str) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The name a certificate must carry: a DNS name or an IP address.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?}: {e}"))
}

/// Client handshake over an established TCP connection.
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    tcp: TcpStream,
) -> io::Result<TlsStream<TcpStream>> {
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    Ok(TlsStream::Client(stream))
}

/// The protocol version and cipher suite of an established session, e.g.
/// `TLSv1_3 TLS13_AES_256_GCM_SHA384`.
pub fn describe(stream: &TlsStream<TcpStream>) -> String {
    let (version, suite) = match stream {
        TlsStream::Client(c) => {
            let conn = c.get_ref().1;
            (conn.protocol_version(), conn.negotiated_cipher_suite())
        }
        TlsStream::Server(s) => {
            let conn = s.get_ref().1;
            (conn.protocol_version(), conn.negotiated_cipher_suite())
        }
    };
    match (version, suite) {
        (Some(v), Some(s)) => format!("{v:?} {:?}", s.suite()),
        _ => "TLS".to_string(),
    }
}

/// Server handshake over an accepted TCP connection.
pub async fn accept(
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
) -> io::Result<TlsStream<TcpStream>> {
    let stream = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
    Ok(TlsStream::Server(stream))
}

/// The read half of a connection: plain TCP keeps tokio's zero-cost split,
/// TLS shares one stream between the halves.
#[derive(Debug)]
pub enum Reader {
    /// Plain TCP.
    Tcp(OwnedReadHalf),
    /// TLS over TCP.
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

/// The write half matching a [`Reader`].
#[derive(Debug)]
pub enum Writer {
    /// Plain TCP.
    Tcp(OwnedWriteHalf),
    /// TLS over TCP.
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
}

/// Splits a plain connection.
pub fn split_tcp(stream: TcpStream) -> (Reader, Writer) {
    let (r, w) = stream.into_split();
    (Reader::Tcp(r), Writer::Tcp(w))
}

/// Splits a TLS connection.
pub fn split_tls(stream: TlsStream<TcpStream>) -> (Reader, Writer) {
    let (r, w) = tokio::io::split(stream);
    (Reader::Tls(r), Writer::Tls(w))
}

/// Puts a plain connection back together for a STARTTLS upgrade; `None`
/// when it is already TLS (a second STARTTLS) or the halves do not match.
pub fn reunite(reader: Reader, writer: Writer) -> Option<TcpStream> {
    match (reader, writer) {
        (Reader::Tcp(r), Writer::Tcp(w)) => r.reunite(w).ok(),
        _ => None,
    }
}

impl Reader {
    /// The TCP socket, for socket options; `None` under TLS.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Reader::Tcp(r) => Some(r.as_ref()),
            Reader::Tls(_) => None,
        }
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Reader::Tls(_))
    }
}

impl AsyncRead for Reader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Reader::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            Reader::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Writer {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Writer::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            Writer::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Writer::Tcp(w) => Pin::new(w).poll_flush(cx),
            Writer::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Writer::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            Writer::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// The verifier behind `danger_accept_invalid_certs`: signatures are still
/// checked (the handshake must be genuine), the chain and name are not.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
