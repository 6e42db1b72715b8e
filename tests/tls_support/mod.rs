//! Shared parts of the TLS and HTTP/2 black-box tests.
//!
//! Owns: certificates made at test time with rcgen (a CA and leaves for
//! `localhost` and 127.0.0.1, written to a scratch directory), TLS client
//! connections that report the certificate they were served, hyper's own
//! HTTP/1.1 and HTTP/2 client connections over any stream, an HTTP/2
//! backend (h2c, or TLS with ALPN) that echoes what it saw and answers
//! `/grpc` with trailers, raw HTTP/2 frames for malformed input, and running
//! HTTP/2 tools (curl, nghttp, h2load) that may be absent. Does not own any
//! assertion about Cohort's behaviour. Builds on `support` (declared by the
//! test file next to this module).

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::support::{DEADLINE, Reply, is_health_probe, scratch_dir, within};

// ---------------------------------------------------------------------------
// Certificates

/// A test CA, its certificate written to `ca`, able to issue leaves.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate for `localhost` and 127.0.0.1 and its key, as files.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate's DER bytes, to compare with what a server presents.
    pub der: Vec<u8>,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = scratch_dir();
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, "Cohort test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("a CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("a CA certificate");
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, issuer.pem()).expect("write the CA");
        Pki { dir, ca, issuer }
    }

    /// Issues a leaf named `name` (its common name) into `<dir>/<name>.crt` and `.key`.
    pub fn leaf(&self, name: &str) -> Leaf {
        self.leaf_for(name, &["localhost", "127.0.0.1"])
    }

    /// A self-signed certificate for `names` that is marked as a CA, as
    /// `openssl req -x509` makes one by default, and its key: its own trust
    /// root.
    pub fn self_signed_ca(&self, name: &str, names: &[&str]) -> Leaf {
        let names = names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("a key");
        let cert = params.self_signed(&key).expect("a self-signed certificate");
        self.write(name, &cert, &key)
    }

    /// A leaf certificate for `names` alone.
    pub fn leaf_for(&self, name: &str, names: &[&str]) -> Leaf {
        let names = names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("a leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("a leaf certificate");
        self.write(name, &cert, &key)
    }

    /// Writes `cert` and `key` as `<name>.crt` and `<name>.key`.
    fn write(&self, name: &str, cert: &rcgen::Certificate, key: &KeyPair) -> Leaf {
        let leaf = Leaf {
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&leaf.cert, cert.pem()).expect("write the certificate");
        std::fs::write(&leaf.key, key.serialize_pem()).expect("write the key");
        leaf
    }
}

/// The `[listen.tls]` section serving `leaf`.
pub fn listen_tls(leaf: &Leaf) -> String {
    format!(
        "[listen.tls]\ncert = {:?}\nkey = {:?}\n",
        leaf.cert, leaf.key
    )
}

// ---------------------------------------------------------------------------
// Clients

/// A TLS client that trusts only `ca` and offers `alpn`.
pub fn tls_client(ca: &Path, alpn: &[&str]) -> TlsConnector {
    let pem = std::fs::read(ca).expect("read the CA");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.expect("a PEM certificate")).expect("a root");
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

use rustls::pki_types::pem::PemObject as _;

pub type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects to `addr` over TLS as `localhost`, checking the chain against the client's CA.
pub async fn tls_connect(addr: SocketAddr, client: &TlsConnector) -> ClientTls {
    within("a TLS handshake", async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        client
            .connect(ServerName::try_from("localhost").expect("a name"), tcp)
            .await
            .expect("the handshake succeeds")
    })
    .await
}

/// The leaf certificate the server presented, DER.
pub fn peer_cert(stream: &ClientTls) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|c| c.to_vec())
        .expect("the server presented a certificate")
}

/// The protocol ALPN chose.
pub fn alpn(stream: &ClientTls) -> Option<String> {
    stream
        .get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
}

pub type H1 = http1::SendRequest<Full<Bytes>>;
pub type H2 = http2::SendRequest<Full<Bytes>>;

/// An HTTP/1.1 client connection over `io` (hyper's own).
pub async fn h1_over<IO>(io: IO) -> H1
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(io))
        .await
        .expect("an HTTP/1.1 handshake");
    tokio::spawn(conn);
    sender
}

/// An HTTP/2 client connection over `io` (hyper's own; prior knowledge on a plain stream).
pub async fn h2_over<IO>(io: IO) -> H2
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .expect("an HTTP/2 handshake");
    tokio::spawn(conn);
    sender
}

/// An HTTP/2 connection with prior knowledge to a plain listener.
pub async fn h2c(addr: SocketAddr) -> H2 {
    h2_over(TcpStream::connect(addr).await.expect("connect")).await
}

/// A GET of `uri` (absolute) with `headers` and an empty body.
pub fn get(uri: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut req = Request::builder().method(Method::GET).uri(uri);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(Full::new(Bytes::new())).expect("a test request")
}

/// Sends `req` on an HTTP/2 connection and reads the whole response.
pub async fn send_h2(sender: &mut H2, req: Request<Full<Bytes>>) -> (Version, Reply) {
    within("an HTTP/2 response", async {
        sender.ready().await.expect("the connection is open");
        let rsp = sender.send_request(req).await.expect("a response");
        (rsp.version(), read(rsp).await)
    })
    .await
}

/// Sends `req` on an HTTP/1.1 connection and reads the whole response.
/// Names the host in `Host`, as every HTTP/1.1 client must.
pub async fn send_h1(sender: &mut H1, mut req: Request<Full<Bytes>>) -> (Version, Reply) {
    if let Some(authority) = req.uri().authority()
        && !req.headers().contains_key(http::header::HOST)
    {
        let host = http::HeaderValue::from_str(authority.as_str()).expect("a host");
        req.headers_mut().insert(http::header::HOST, host);
    }
    within("an HTTP/1.1 response", async {
        sender.ready().await.expect("the connection is open");
        let rsp = sender.send_request(req).await.expect("a response");
        (rsp.version(), read(rsp).await)
    })
    .await
}

async fn read(rsp: Response<Incoming>) -> Reply {
    let (parts, body) = rsp.into_parts();
    let body = body.collect().await.expect("a whole body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

// ---------------------------------------------------------------------------
// Backends

type BackendBody = UnsyncBoxBody<Bytes, Infallible>;

/// An upstream that speaks HTTP/2: with prior knowledge (h2c), or over TLS
/// with ALPN (`h2` or `http/1.1`, or `http/1.1` alone). Answers like `support::Backend` (JSON
/// with `backend` and the `headers` it saw, plus the HTTP `version` and
/// the request's `body`), and
/// `/grpc` with a gRPC-style body and `grpc-status: 0` trailers.
#[derive(Debug, Clone)]
pub struct H2Backend {
    pub name: String,
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    probes: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
}

impl H2Backend {
    pub const GRPC_MESSAGE: &'static [u8] = b"\0\0\0\0\x05hello";

    /// An h2c backend.
    pub async fn h2c(name: &str) -> H2Backend {
        Self::start(name, None).await
    }

    /// A TLS backend serving `leaf`, HTTP/2 or HTTP/1.1 by ALPN.
    pub async fn tls(name: &str, leaf: &Leaf) -> H2Backend {
        Self::tls_offering(name, leaf, &[b"h2", b"http/1.1"]).await
    }

    /// A TLS backend serving `leaf` that offers only HTTP/1.1 by ALPN.
    pub async fn tls_http1(name: &str, leaf: &Leaf) -> H2Backend {
        Self::tls_offering(name, leaf, &[b"http/1.1"]).await
    }

    async fn tls_offering(name: &str, leaf: &Leaf, alpn: &[&[u8]]) -> H2Backend {
        Self::start(name, Some(acceptor(leaf, alpn))).await
    }

    async fn start(name: &str, tls: Option<TlsAcceptor>) -> H2Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let backend = H2Backend {
            name: name.to_owned(),
            addr: listener.local_addr().expect("an address"),
            hits: Arc::default(),
            probes: Arc::default(),
            connections: Arc::default(),
        };
        let state = backend.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                state.connections.fetch_add(1, Ordering::SeqCst);
                let state = state.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.answer(req).await) }
                    });
                    match tls {
                        None => {
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(tcp), service)
                                .await;
                        }
                        Some(tls) => {
                            let Ok(stream) = tls.accept(tcp).await else {
                                return;
                            };
                            let _ =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                                    .await;
                        }
                    }
                });
            }
        });
        backend
    }

    /// Requests other than health probes.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Cohort's health probes answered.
    pub fn probes(&self) -> usize {
        self.probes.load(Ordering::SeqCst)
    }

    /// Connections accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Switches to the protocol asked for, then echoes every byte back.
    fn echo_upgrade(&self, mut req: Request<Incoming>) -> Response<BackendBody> {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
            let _ = tokio::io::copy(&mut reader, &mut writer).await;
        });
        let mut rsp = Response::new(Full::new(Bytes::new()).boxed_unsync());
        *rsp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let protocol = req.headers()["upgrade"].clone();
        rsp.headers_mut().insert("upgrade", protocol);
        rsp.headers_mut()
            .insert("connection", HeaderValue::from_static("upgrade"));
        rsp
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<BackendBody> {
        if is_health_probe(&req) {
            self.probes.fetch_add(1, Ordering::SeqCst);
            return Response::new(Full::new(Bytes::from_static(b"ok")).boxed_unsync());
        }
        self.hits.fetch_add(1, Ordering::SeqCst);
        if req.version() == Version::HTTP_11 && req.headers().contains_key("upgrade") {
            return self.echo_upgrade(req);
        }
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|whole| whole.to_bytes())
            .unwrap_or_default();
        if parts.uri.path() == "/grpc" {
            let te = parts.headers.get("te").cloned();
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            trailers.insert("grpc-message", HeaderValue::from_static("ok"));
            let frames = futures_util::stream::iter([
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(Self::GRPC_MESSAGE))),
                Ok(Frame::trailers(trailers)),
            ]);
            let mut rsp = Response::new(StreamBody::new(frames).boxed_unsync());
            rsp.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            // What gRPC servers require of a request: `te: trailers`.
            if let Some(te) = te {
                rsp.headers_mut().insert("x-saw-te", te);
            }
            rsp.headers_mut().insert(
                "x-backend",
                HeaderValue::from_str(&self.name).expect("a name"),
            );
            return rsp;
        }
        let headers: Vec<[String; 2]> = parts
            .headers
            .iter()
            .map(|(n, v)| {
                [
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                ]
            })
            .collect();
        let json = serde_json::json!({
            "backend": self.name,
            "version": format!("{:?}", parts.version),
            "uri": parts.uri.to_string(),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
        });
        let mut rsp = Response::new(Full::new(Bytes::from(json.to_string())).boxed_unsync());
        rsp.headers_mut().insert(
            "x-backend",
            HeaderValue::from_str(&self.name).expect("a name"),
        );
        rsp
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP/2

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// One frame: 9-byte header and payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("a small frame");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix, the first byte's high bits set to `high`.
fn hpack_int(high: u8, n: u32, mut value: usize, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(high | value as u8);
        return;
    }
    out.push(high | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header field as an HPACK literal without indexing, with a new name (no Huffman).
pub fn hpack_literal(name: &str, value: &str, out: &mut Vec<u8>) {
    out.push(0x00);
    hpack_int(0, 7, name.len(), out);
    out.extend_from_slice(name.as_bytes());
    hpack_int(0, 7, value.len(), out);
    out.extend_from_slice(value.as_bytes());
}

/// The header block of a request to `path` on `authority` (`method` GET or POST).
pub fn request_block(
    method: Method,
    authority: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let mut out = Vec::new();
    // Static table: 2 = :method GET, 3 = :method POST, 6 = :scheme http.
    out.push(if method == Method::POST { 0x83 } else { 0x82 });
    out.push(0x86);
    // :path (index 4) and :authority (index 1) as literals with indexed names.
    out.push(0x04);
    hpack_int(0, 7, path.len(), &mut out);
    out.extend_from_slice(path.as_bytes());
    out.push(0x01);
    hpack_int(0, 7, authority.len(), &mut out);
    out.extend_from_slice(authority.as_bytes());
    for (name, value) in extra {
        hpack_literal(name, value, &mut out);
    }
    out
}

/// A frame read from a raw HTTP/2 connection.
#[derive(Debug)]
pub struct RawFrame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// A client speaking raw HTTP/2 frames with prior knowledge.
pub struct RawH2 {
    pub stream: TcpStream,
}

impl RawH2 {
    /// Connects, sends the preface and empty SETTINGS, and acknowledges the server's SETTINGS.
    pub async fn open(addr: SocketAddr) -> RawH2 {
        let mut raw = RawH2 {
            stream: TcpStream::connect(addr).await.expect("connect"),
        };
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        raw.write(&hello).await;
        loop {
            let f = raw
                .next_frame()
                .await
                .expect("the server's SETTINGS arrive");
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                raw.write(&frame(SETTINGS, ACK, 0, &[])).await;
                return raw;
            }
        }
    }

    /// Writes `bytes`; a server that already closed is not an error here.
    pub async fn write(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next frame, or `None` once the server closed the connection.
    pub async fn next_frame(&mut self) -> Option<RawFrame> {
        within("an HTTP/2 frame or the end", async {
            let mut head = [0u8; 9];
            if self.stream.read_exact(&mut head).await.is_err() {
                return None;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if self.stream.read_exact(&mut payload).await.is_err() {
                return None;
            }
            Some(RawFrame {
                kind: head[3],
                flags: head[4],
                stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
                payload,
            })
        })
        .await
    }

    /// Reads frames until one for which `stop` holds, skipping SETTINGS,
    /// PING, WINDOW_UPDATE and the like; `None` if the connection ends first.
    pub async fn until(&mut self, mut stop: impl FnMut(&RawFrame) -> bool) -> Option<RawFrame> {
        loop {
            let f = self.next_frame().await?;
            if stop(&f) {
                return Some(f);
            }
        }
    }
}

/// A TLS acceptor serving `leaf`, offering `alpn`.
fn acceptor(leaf: &Leaf, alpn: &[&[u8]]) -> TlsAcceptor {
    let cert = rustls::pki_types::CertificateDer::pem_file_iter(&leaf.cert)
        .expect("read the leaf")
        .collect::<Result<Vec<_>, _>>()
        .expect("a PEM certificate");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&leaf.key).expect("a PEM key");
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(cert, key)
        .expect("a server config");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsAcceptor::from(Arc::new(config))
}

/// An HTTP/2 upstream (h2c, or TLS with ALPN `h2`) that allows
/// [`BigH2Backend::MAX_STREAMS`] streams per connection, and answers `/big`
/// with a body that never ends, in 64 KiB chunks made as its connection
/// takes them, `/hold` with a body that never sends a byte, and anything
/// else with [`BigH2Backend::SMALL`] bytes; it counts its connections and
/// the bytes of the endless bodies taken so far.
#[derive(Debug, Clone)]
pub struct BigH2Backend {
    pub addr: SocketAddr,
    taken: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
}

impl BigH2Backend {
    pub const SMALL: usize = 1024;
    pub const MAX_STREAMS: u32 = 10;

    /// With prior knowledge (h2c).
    pub async fn start() -> BigH2Backend {
        Self::serve(None).await
    }

    /// Over TLS, serving `leaf`.
    pub async fn tls(leaf: &Leaf) -> BigH2Backend {
        Self::serve(Some(acceptor(leaf, &[b"h2"]))).await
    }

    async fn serve(tls: Option<TlsAcceptor>) -> BigH2Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let backend = BigH2Backend {
            addr: listener.local_addr().expect("an address"),
            taken: Arc::default(),
            connections: Arc::default(),
        };
        let taken = backend.taken.clone();
        let connections = backend.connections.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let taken = taken.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    let taken = taken.clone();
                    async move {
                        let body = match req.uri().path() {
                            "/big" => {
                                let chunk = Bytes::from(vec![b'x'; 64 << 10]);
                                let chunks = futures_util::stream::repeat_with(move || {
                                    taken.fetch_add(chunk.len(), Ordering::SeqCst);
                                    Ok(Frame::data(chunk.clone()))
                                });
                                StreamBody::new(chunks).boxed_unsync()
                            }
                            "/hold" => {
                                StreamBody::new(futures_util::stream::pending()).boxed_unsync()
                            }
                            _ => Full::new(Bytes::from(vec![b'y'; Self::SMALL])).boxed_unsync(),
                        };
                        Ok::<_, Infallible>(Response::new(body))
                    }
                });
                let tls = tls.clone();
                tokio::spawn(async move {
                    let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(Self::MAX_STREAMS)
                        .clone();
                    let _ = match tls {
                        None => builder.serve_connection(TokioIo::new(tcp), service).await,
                        Some(tls) => {
                            let Ok(stream) = tls.accept(tcp).await else {
                                return;
                            };
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                        }
                    };
                });
            }
        });
        backend
    }

    /// Connections accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Bytes of the endless bodies its connections have taken.
    pub fn taken(&self) -> usize {
        self.taken.load(Ordering::SeqCst)
    }
}

/// How a [`RawH2Upstream`] meets one request stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamTurn {
    /// `:status 200` and the end of the stream.
    Answer,
    /// RST_STREAM with this error code (2 INTERNAL_ERROR, 7 REFUSED_STREAM).
    Reset(u32),
    /// A graceful GOAWAY (NO_ERROR) that names the stream before this one
    /// as the last processed, so this one goes unprocessed; the connection
    /// stays open, and any stream opened on it later goes unanswered.
    GoAway,
    /// `:status 200` and the start of a body, then the connection closed
    /// with no more of it.
    CutMidBody,
}

/// An h2c upstream written in raw frames, to do what a library server
/// cannot be made to: it meets each request stream, counted from 0 across
/// all its connections, as `turn` says.
pub struct RawH2Upstream {
    pub addr: SocketAddr,
    streams: Arc<AtomicUsize>,
    after_goaway: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
}

impl RawH2Upstream {
    pub async fn start(turn: fn(usize) -> StreamTurn) -> RawH2Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream = RawH2Upstream {
            addr: listener.local_addr().expect("an address"),
            streams: Arc::default(),
            after_goaway: Arc::default(),
            connections: Arc::default(),
        };
        let streams = upstream.streams.clone();
        let after_goaway = upstream.after_goaway.clone();
        let connections = upstream.connections.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_raw_h2(
                    tcp,
                    turn,
                    streams.clone(),
                    after_goaway.clone(),
                ));
            }
        });
        upstream
    }

    /// Request streams opened, on all connections.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }

    /// Streams opened on a connection after it sent GOAWAY, which a client
    /// must not open.
    pub fn streams_after_goaway(&self) -> usize {
        self.after_goaway.load(Ordering::SeqCst)
    }

    /// Connections accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve_raw_h2(
    mut tcp: TcpStream,
    turn: fn(usize) -> StreamTurn,
    streams: Arc<AtomicUsize>,
    after_goaway: Arc<AtomicUsize>,
) {
    let mut preface = [0u8; PREFACE.len()];
    if tcp.read_exact(&mut preface).await.is_err() || preface != PREFACE {
        return;
    }
    if tcp.write_all(&frame(SETTINGS, 0, 0, &[])).await.is_err() {
        return;
    }
    let mut gone_away = false;
    loop {
        let mut head = [0u8; 9];
        if tcp.read_exact(&mut head).await.is_err() {
            return;
        }
        let mut payload = vec![0u8; u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize];
        if tcp.read_exact(&mut payload).await.is_err() {
            return;
        }
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let reply = match kind {
            SETTINGS if flags & ACK == 0 => frame(SETTINGS, ACK, 0, &[]),
            HEADERS if gone_away => {
                after_goaway.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            HEADERS => match turn(streams.fetch_add(1, Ordering::SeqCst)) {
                // 0x88: `:status 200`, index 8 of HPACK's static table.
                StreamTurn::Answer => frame(HEADERS, END_HEADERS | END_STREAM, stream, &[0x88]),
                StreamTurn::Reset(code) => frame(RST_STREAM, 0, stream, &code.to_be_bytes()),
                StreamTurn::CutMidBody => {
                    let mut reply = frame(HEADERS, END_HEADERS, stream, &[0x88]);
                    reply.extend(frame(DATA, 0, stream, b"the start"));
                    let _ = tcp.write_all(&reply).await;
                    return;
                }
                StreamTurn::GoAway => {
                    gone_away = true;
                    let mut last_and_code = stream.saturating_sub(2).to_be_bytes().to_vec();
                    last_and_code.extend_from_slice(&0u32.to_be_bytes());
                    frame(GOAWAY, 0, 0, &last_and_code)
                }
            },
            _ => continue,
        };
        if tcp.write_all(&reply).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// Tools

/// Fails the test unless `program` can be run: a test that passed without
/// its tool would claim what it never checked.
pub fn require(program: &str) {
    if let Err(error) = std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        panic!(
            "cannot run {program} (Debian package curl or nghttp2-client; \
             scripts/test.sh installs them when they are missing): {error}"
        );
    }
}

/// Runs `program` with `args` to its end (within the deadline); returns its status and output.
pub async fn run(program: &str, args: &[&str]) -> (bool, String) {
    let output = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within {DEADLINE:?}"))
    .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// The JSON of an echo `Reply` as the H2 backend writes it: the HTTP version it saw.
pub fn seen_version(reply: &Reply) -> String {
    reply.json()["version"]
        .as_str()
        .unwrap_or_else(|| panic!("no version in {:?}", reply.body))
        .to_owned()
}

/// Whether `status` is the one the test expects, with the reply in the message.
pub fn status_is(reply: &Reply, status: StatusCode) {
    assert_eq!(reply.status, status, "{reply:?}");
}
