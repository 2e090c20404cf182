//! A small line-based SMTP client for probing (RFC 5321 replies, STARTTLS
//! over rustls), with a timeout on every step.
//!
//! Why not a client crate: lettre's `SmtpConnection::command` does send a
//! raw line, but its connect reads the greeting and EHLO itself (a 4xx or
//! 5xx greeting becomes an error whose reply is only in its `Display`), every
//! non-2xx reply becomes an `Err` rather than a reply to record, and its
//! `ServerInfo` is not refreshed by an EHLO sent through `command` (needed
//! after XCLIENT). A probe needs every reply as it came, which is what this
//! does, in about as many lines as the glue around lettre would take.
//!
//! The server's certificate is NOT verified: this is a probe of what the
//! server accepts, not a delivery; a man in the middle could only make a
//! relay look closed or open to this one test.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader},
    net::TcpSocket,
};

/// Longest reply line read (RFC 5321 4.5.3.1.5 says 512; servers exceed it).
const MAX_LINE: u64 = 4096;
/// Most lines in one reply (an EHLO reply has one per extension).
const MAX_LINES: usize = 100;

/// One SMTP reply: the code and the text of each line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// The reply as one line: `550 5.7.1 relay denied` (lines joined by ` / `).
    pub fn one_line(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" / "))
    }

    /// The EHLO keywords (first word of each line after the first), upper case.
    pub fn keywords(&self) -> Vec<String> {
        self.lines
            .iter()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_ascii_uppercase)
            .collect()
    }

    /// Whether the EHLO reply offers `keyword` (e.g. `STARTTLS`, `AUTH`).
    pub fn offers(&self, keyword: &str) -> bool {
        self.keywords().iter().any(|k| k == keyword)
    }
}

/// Why a step failed without a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum Failure {
    /// The connection was refused (RST): nothing listens, or a filter rejects.
    #[error("closed: connection refused")]
    Closed,
    /// No answer to the SYN within the timeout, or no route: a filter that
    /// drops (relay-guard itself does), or a host that is down.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The server did not answer a command within the timeout.
    #[error("timed out waiting for the reply to {0}")]
    Timeout(String),
    /// The TLS handshake failed.
    #[error("TLS failed: {0}")]
    Tls(String),
    /// The connection broke, or the server sent something that is not SMTP.
    #[error("{0}")]
    Protocol(String),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An SMTP connection.
pub struct Client {
    stream: BufReader<Box<dyn Io>>,
    timeout: Duration,
    /// The TCP endpoints, for the report and the trusted-source warning.
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Whether the session is now encrypted.
    pub tls: bool,
}

/// Connects to `addr` within `timeout`; with `implicit_tls` (port 465) the
/// TLS handshake follows at once. Does not read the greeting.
pub async fn connect(addr: SocketAddr, timeout: Duration, implicit_tls: bool, sni: &str) -> Result<Client, Failure> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| Failure::Protocol(format!("cannot create a socket: {e}")))?;
    let tcp = match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Err(_) => {
            return Err(Failure::Unreachable(format!(
                "no answer to the connection attempt within {}s (packets dropped, or the host is down)",
                timeout.as_secs_f32()
            )));
        }
        Ok(Err(e)) => return Err(connect_error(&e)),
        Ok(Ok(s)) => s,
    };
    let local = tcp
        .local_addr()
        .map_err(|e| Failure::Protocol(format!("local address: {e}")))?;
    let mut client = Client {
        stream: BufReader::new(Box::new(tcp) as Box<dyn Io>),
        timeout,
        local,
        peer: addr,
        tls: false,
    };
    if implicit_tls {
        client.start_tls(sni).await?;
    }
    Ok(client)
}

fn connect_error(e: &std::io::Error) -> Failure {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Failure::Closed,
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => {
            Failure::Unreachable(e.to_string())
        }
        _ => Failure::Unreachable(format!("connect failed: {e}")),
    }
}

impl Client {
    /// Reads one reply (all its lines).
    pub async fn read_reply(&mut self, what: &str) -> Result<Reply, Failure> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.read_reply_inner()).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout(what.to_string())),
        }
    }

    async fn read_reply_inner(&mut self) -> Result<Reply, Failure> {
        let mut lines = Vec::new();
        let mut code = 0;
        loop {
            let mut buf = Vec::new();
            let n = (&mut self.stream)
                .take(MAX_LINE)
                .read_until(b'\n', &mut buf)
                .await
                .map_err(|e| Failure::Protocol(format!("connection failed: {e}")))?;
            if n == 0 {
                return Err(Failure::Protocol("the server closed the connection".into()));
            }
            if buf.last() != Some(&b'\n') {
                return Err(Failure::Protocol(format!("reply line longer than {MAX_LINE} bytes")));
            }
            let line = String::from_utf8_lossy(&buf);
            let line = line.trim_end_matches(['\r', '\n']);
            let (c, sep, text) = match (line.get(..3), line.get(3..4), line.get(4..)) {
                (Some(c), sep, text) if c.bytes().all(|b| b.is_ascii_digit()) => {
                    (c.parse::<u16>().unwrap_or(0), sep.unwrap_or(" "), text.unwrap_or(""))
                }
                _ => return Err(Failure::Protocol(format!("not an SMTP reply: {line:?}"))),
            };
            if !lines.is_empty() && c != code {
                return Err(Failure::Protocol(format!(
                    "reply code changed within a reply: {line:?}"
                )));
            }
            code = c;
            lines.push(text.to_string());
            match sep {
                "-" if lines.len() < MAX_LINES => {}
                "-" => return Err(Failure::Protocol(format!("reply longer than {MAX_LINES} lines"))),
                _ => return Ok(Reply { code, lines }),
            }
        }
    }

    /// Sends `line` (CRLF added) and reads the reply.
    pub async fn command(&mut self, line: &str) -> Result<Reply, Failure> {
        self.send(line.as_bytes()).await?;
        self.stream
            .write_all(b"\r\n")
            .await
            .map_err(|e| Failure::Protocol(format!("sending {line:?} failed: {e}")))?;
        self.flush(line).await?;
        self.read_reply(line).await
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        match tokio::time::timeout(self.timeout, self.stream.get_mut().write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Failure::Protocol(format!("sending failed: {e}"))),
            Err(_) => Err(Failure::Timeout("sending".into())),
        }
    }

    async fn flush(&mut self, what: &str) -> Result<(), Failure> {
        match tokio::time::timeout(self.timeout, self.stream.get_mut().flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Failure::Protocol(format!("sending {what:?} failed: {e}"))),
            Err(_) => Err(Failure::Timeout(what.to_string())),
        }
    }

    /// Sends a message body (already CRLF, no line starting with `.`) and
    /// the end-of-data mark, and reads the reply.
    pub async fn data_body(&mut self, body: &str) -> Result<Reply, Failure> {
        self.send(body.as_bytes()).await?;
        self.send(b".\r\n").await?;
        self.flush("end of data").await?;
        self.read_reply("end of data").await
    }

    /// The TLS handshake on the connection as it is (after a 220 to
    /// STARTTLS, or at once on port 465). Refuses when the server sent more
    /// after its 220 (a command injection attempt, CVE-2011-0411 style).
    pub async fn start_tls(&mut self, sni: &str) -> Result<(), Failure> {
        if !self.stream.buffer().is_empty() {
            return Err(Failure::Tls("the server sent data after its STARTTLS reply".into()));
        }
        let name = match sni.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => {
                ServerName::try_from(sni.to_string()).map_err(|e| Failure::Tls(format!("server name {sni:?}: {e}")))?
            }
        };
        let stream = std::mem::replace(
            &mut self.stream,
            BufReader::new(Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink())) as Box<dyn Io>),
        )
        .into_inner();
        let connector = tokio_rustls::TlsConnector::from(tls_config());
        let tls = match tokio::time::timeout(self.timeout, connector.connect(name, stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(Failure::Tls(e.to_string())),
            Err(_) => return Err(Failure::Timeout("the TLS handshake".into())),
        };
        self.stream = BufReader::new(Box::new(tls));
        self.tls = true;
        Ok(())
    }

    /// QUIT, without waiting long for the answer.
    pub async fn quit(mut self) {
        self.timeout = self.timeout.min(Duration::from_secs(2));
        let _ = self.command("QUIT").await;
    }
}

/// A client config that accepts any certificate (see the module docs).
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    Arc::clone(CONFIG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(AcceptAnyCert(provider.signature_verification_algorithms));
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Arc::new(config)
    }))
}

/// Accepts every server certificate but still checks the handshake
/// signatures (so the session is at least encrypted to whoever answered).
#[derive(Debug)]
struct AcceptAnyCert(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
