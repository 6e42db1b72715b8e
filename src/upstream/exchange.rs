//! Cohort's own HTTP/1.1 client exchange, for requests with no body and no
//! upgrade: `GET`s and `HEAD`s, streams opened by a `GET` (SSE), health
//! probes.
//!
//! hyper's client hands each request to a connection task through a channel
//! and the response back the same way, which was the largest share of
//! Cohort's user-space cost per request (`BENCHMARKS.md`). Here the
//! request's own task writes the head, reads the answer and streams its
//! body from the socket, with no task or channel in between. A request
//! with a body (an agent's `POST`) still goes through hyper's client, which
//! sends the body while the answer may already be coming.
//!
//! Owns: writing a request head, reading the response head (with
//! `httparse`; `1xx` heads are skipped), reading the body by its framing
//! (RFC 9112 section 6.3: none for `HEAD`, `204` and `304`; `chunked`,
//! trailers included; a `Content-Length`; or up to the close), and saying
//! whether the connection may take another request afterwards. Does not
//! own: which connection is used and when it goes back to the pool
//! (`http1`), nor requests with a body, an `Upgrade` or `CONNECT`, which
//! hyper's client carries there.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf as _, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::{Frame, SizeHint};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

use super::connect::OpenCount;

/// The most bytes a response head, or a trailer section, may take. nginx
/// allows a page by default (`proxy_buffer_size`); hyper about 400 KiB.
const MAX_HEAD: usize = 64 * 1024;
/// The most fields a response head, or a trailer section, may have
/// (hyper's default).
const MAX_HEADERS: usize = 100;
/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// The room each read asks for.
const READ_SIZE: usize = 8 * 1024;

/// Whether `req` is carried here: no body, no `Upgrade`, not `CONNECT`.
pub fn carries<B: hyper::body::Body>(req: &Request<B>) -> bool {
    req.body().is_end_stream()
        && req.method() != Method::CONNECT
        && !req.headers().contains_key(UPGRADE)
}

/// `req`'s head as HTTP/1.1: its method, its target in origin form, and its
/// headers as they are, except a `Transfer-Encoding`, which a request with
/// no body has nothing to apply to (hyper drops it too).
#[must_use]
pub fn encode_head<B>(req: &Request<B>) -> Vec<u8> {
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let method = req.method().as_str();
    let fields: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    let mut head = Vec::with_capacity(method.len() + target.len() + 13 + fields);
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        if name == TRANSFER_ENCODING {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection closed, or was reset, before a whole final response
    /// head came back: what an upstream closing an idle connection looks like.
    #[error("the upstream closed the connection without answering")]
    Unanswered(#[source] io::Error),
    #[error("the connection failed")]
    Io(#[from] io::Error),
    #[error("the response head is not valid HTTP/1.1")]
    Head(#[source] httparse::Error),
    #[error("the response head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("{0}")]
    Framing(&'static str),
}

/// How a response's body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a `HEAD` request's answer, `204`, `304`, or a
    /// `Content-Length` of 0.
    Empty,
    Length(u64),
    Chunked,
    /// Everything up to the close.
    ToClose,
}

/// A response head as read: the response without its body, how the body is
/// delimited, and whether the connection may take another request after it.
#[derive(Debug)]
pub struct Head {
    pub response: Response<()>,
    pub framing: Framing,
    pub keep_alive: bool,
}

/// An HTTP/1.1 connection to a plain `host:port` upstream, with the bytes
/// read from it and not yet used.
#[derive(Debug)]
pub struct Conn {
    tcp: TcpStream,
    read: BytesMut,
    _open: OpenCount,
}

impl Conn {
    #[must_use]
    pub fn new(tcp: TcpStream, open: OpenCount) -> Conn {
        Conn {
            tcp,
            read: BytesMut::new(),
            _open: open,
        }
    }

    /// Whether this idle connection can no longer take a request: the
    /// upstream has closed it, or sent something unasked. Costs a system
    /// call only when the reactor has seen the socket become readable,
    /// which an idle connection in good order never is.
    #[must_use]
    pub fn is_stale(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        if self.tcp.poll_read_ready(&mut cx).is_pending() {
            return false;
        }
        // Readiness can be left over from the last read of the response;
        // only a read tells.
        let mut byte = [0u8; 1];
        !matches!(self.tcp.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Whether everything read from the connection has been used, so that
    /// the next bytes on it are the next response's.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.read.is_empty()
    }

    /// Writes a request head made by [`encode_head`].
    pub async fn write_head(&mut self, head: &[u8]) -> io::Result<()> {
        self.tcp.write_all(head).await
    }

    /// Reads the final response head to a request made with `method`.
    pub async fn read_head(&mut self, method: &Method) -> Result<Head, Error> {
        loop {
            if !self.read.is_empty()
                && let Some(head) = self.parse_head(method)?
            {
                return Ok(head);
            }
            if self.read.len() >= MAX_HEAD {
                return Err(Error::HeadTooLarge);
            }
            match std::future::poll_fn(|cx| self.poll_read(cx)).await {
                Ok(0) => return Err(Error::Unanswered(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(error) if is_reset(&error) => return Err(Error::Unanswered(error)),
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Parses a final response head from the bytes read, skipping `1xx`
    /// ones; `None` until a whole one is in.
    fn parse_head(&mut self, method: &Method) -> Result<Option<Head>, Error> {
        loop {
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut fields);
            let len = match parsed.parse(&self.read).map_err(Error::Head)? {
                httparse::Status::Complete(len) => len,
                httparse::Status::Partial => return Ok(None),
            };
            let status = parsed
                .code
                .and_then(|code| StatusCode::from_u16(code).ok())
                .ok_or(Error::Framing("the response's status code is out of range"))?;
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(Error::Framing(
                    "a 101 answered a request that asked for no upgrade",
                ));
            }
            if status.is_informational() {
                // `100 Continue`, `103 Early Hints` and the like: the final
                // answer follows on the same connection.
                self.read.advance(len);
                if self.read.is_empty() {
                    return Ok(None);
                }
                continue;
            }
            let version = if parsed.version == Some(0) {
                Version::HTTP_10
            } else {
                Version::HTTP_11
            };
            // Where each field is in the read bytes, so that the values can
            // share them rather than be copied.
            let base = self.read.as_ptr() as usize;
            let mut spans = [(0usize, 0usize, 0usize, 0usize); MAX_HEADERS];
            let count = parsed.headers.len();
            for (span, field) in spans.iter_mut().zip(parsed.headers.iter()) {
                let name = field.name.as_ptr() as usize - base;
                let value = field.value.as_ptr() as usize - base;
                *span = (name, field.name.len(), value, field.value.len());
            }
            let bytes = self.read.split_to(len).freeze();
            let mut headers = HeaderMap::with_capacity(count);
            for &(name, name_len, value, value_len) in &spans[..count] {
                let name = HeaderName::from_bytes(&bytes[name..name + name_len])
                    .map_err(|_| Error::Framing("a response header's name is not valid"))?;
                let value =
                    HeaderValue::from_maybe_shared(bytes.slice(value..value + value_len))
                        .map_err(|_| Error::Framing("a response header's value is not valid"))?;
                headers.append(name, value);
            }
            let (framing, keep_alive) = framing(method, status, version, &headers)?;
            let mut response = Response::new(());
            *response.status_mut() = status;
            *response.version_mut() = version;
            *response.headers_mut() = headers;
            return Ok(Some(Head {
                response,
                framing,
                keep_alive,
            }));
        }
    }

    /// Reads more of the connection into `read`; 0 at its end.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.read.reserve(READ_SIZE);
        poll_read_buf(Pin::new(&mut self.tcp), cx, &mut self.read)
    }
}

/// Whether an I/O error means the peer closed or reset the connection.
fn is_reset(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// The framing of a response's body, and whether its connection may be
/// used again after it (RFC 9112 sections 6.3 and 9.3).
fn framing(
    method: &Method,
    status: StatusCode,
    version: Version,
    headers: &HeaderMap,
) -> Result<(Framing, bool), Error> {
    let close = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
    let keep_alive = version == Version::HTTP_11 && !close;
    if method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Empty, keep_alive));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(Error::Framing(
                "an HTTP/1.0 response has a Transfer-Encoding",
            ));
        }
        let last = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|coding| !coding.is_empty());
        // A length beside a transfer coding is not the body's length, and
        // the sender is not to be trusted with another message.
        let keep_alive = keep_alive && !headers.contains_key(CONTENT_LENGTH);
        return Ok(match last {
            Some(coding) if coding.eq_ignore_ascii_case(b"chunked") => {
                (Framing::Chunked, keep_alive)
            }
            _ => (Framing::ToClose, false),
        });
    }
    match content_length(headers)? {
        Some(0) => Ok((Framing::Empty, keep_alive)),
        Some(len) => Ok((Framing::Length(len), keep_alive)),
        None => Ok((Framing::ToClose, false)),
    }
}

/// The `Content-Length`, if any: every value (in one field or several) the
/// same number, or the response is refused, since two lengths mean two
/// readings of where the body ends.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Error> {
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for item in value.as_bytes().split(|&b| b == b',') {
            let item = item.trim_ascii();
            let parsed =
                (!item.is_empty() && item.len() <= 19 && item.iter().all(u8::is_ascii_digit))
                    .then(|| std::str::from_utf8(item).ok()?.parse::<u64>().ok())
                    .flatten()
                    .ok_or(Error::Framing(
                        "the response's Content-Length is not a number",
                    ))?;
            if length.is_some_and(|seen| seen != parsed) {
                return Err(Error::Framing(
                    "the response has two different Content-Length values",
                ));
            }
            length = Some(parsed);
        }
    }
    Ok(length)
}

/// Reads a response body from its connection, frame by frame.
#[derive(Debug)]
pub struct Decoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Bytes left of a `Content-Length` body.
    Length(u64),
    ChunkSize,
    /// Bytes left of a chunk's data.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailers,
    ToClose,
    Done,
}

impl Decoder {
    #[must_use]
    pub fn new(framing: Framing) -> Decoder {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(len) => State::Length(len),
            Framing::Chunked => State::ChunkSize,
            Framing::ToClose => State::ToClose,
        };
        Decoder { state }
    }

    /// Whether the whole body has been read.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    #[must_use]
    pub fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }

    /// The next frame of the body on `conn`: data, then trailers if a
    /// chunked body has them; `None` at its end.
    pub fn poll_frame(
        &mut self,
        conn: &mut Conn,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            let read = &mut conn.read;
            match self.state {
                State::Done => return Poll::Ready(None),
                State::Length(left) | State::ChunkData(left) if !read.is_empty() => {
                    let take =
                        usize::try_from(left).map_or(read.len(), |left| left.min(read.len()));
                    let data = read.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), left) => State::Length(left),
                        (_, 0) => State::ChunkEnd,
                        (_, left) => State::ChunkData(left),
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::ToClose if !read.is_empty() => {
                    let data = read.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::ChunkSize => {
                    if let Some(lf) = read.iter().position(|&b| b == b'\n') {
                        let size = chunk_size(&read[..lf])?;
                        read.advance(lf + 1);
                        self.state = if size == 0 {
                            State::Trailers
                        } else {
                            State::ChunkData(size)
                        };
                        continue;
                    }
                    if read.len() > MAX_CHUNK_LINE {
                        return Poll::Ready(Some(Err(Error::Framing(
                            "a chunk-size line is too long",
                        ))));
                    }
                }
                State::ChunkEnd if read.len() >= 2 => {
                    if read[..2] != *b"\r\n" {
                        return Poll::Ready(Some(Err(Error::Framing(
                            "a chunk's data is not followed by CRLF",
                        ))));
                    }
                    read.advance(2);
                    self.state = State::ChunkSize;
                    continue;
                }
                State::Trailers if !read.is_empty() => {
                    if read.starts_with(b"\r\n") {
                        read.advance(2);
                        self.state = State::Done;
                        return Poll::Ready(None);
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(read, &mut fields) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let trailers = trailers(fields)?;
                            read.advance(len);
                            self.state = State::Done;
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        Ok(httparse::Status::Partial) if read.len() >= MAX_HEAD => {
                            return Poll::Ready(Some(Err(Error::HeadTooLarge)));
                        }
                        Ok(httparse::Status::Partial) => {}
                        Err(error) => return Poll::Ready(Some(Err(Error::Head(error)))),
                    }
                }
                _ => {}
            }
            // Nothing to make a frame of yet: read more.
            if ready!(conn.poll_read(cx))? == 0 {
                if self.state == State::ToClose {
                    self.state = State::Done;
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(Error::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection before the end of the body",
                )))));
            }
        }
    }
}

/// The size of a chunk, from its line up to (not including) the LF: hex
/// digits, then optional extensions after a `;`, which are ignored, then
/// the CR.
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let invalid = || Error::Framing("a chunk size is not valid");
    let line = line.strip_suffix(b"\r").ok_or_else(invalid)?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 || line.contains(&b'\r') {
        return Err(invalid());
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err(invalid());
    }
    let digits = std::str::from_utf8(&line[..digits]).map_err(|_| invalid())?;
    u64::from_str_radix(digits, 16).map_err(|_| invalid())
}

/// A trailer section as a header map; its values are copied, since the
/// read buffer goes on to the next response.
fn trailers(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, Error> {
    let mut trailers = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| Error::Framing("a trailer's name is not valid"))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| Error::Framing("a trailer's value is not valid"))?;
        trailers.append(name, value);
    }
    Ok(trailers)
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use http_body_util::Empty;
    use proptest::prelude::*;
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpListener;

    use super::*;

    /// A connection whose other end the test writes the upstream's side of.
    async fn pair() -> (Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (upstream, _) = listener.accept().await.unwrap();
        (
            Conn::new(client, OpenCount::new(metrics::Gauge::noop())),
            upstream,
        )
    }

    /// A body read to its end: the data joined, the trailers if any.
    #[derive(Debug, Default, PartialEq)]
    struct Read {
        data: Vec<u8>,
        trailers: Option<HeaderMap>,
    }

    async fn read_body(conn: &mut Conn, framing: Framing) -> Result<Read, Error> {
        let mut decoder = Decoder::new(framing);
        let mut read = Read::default();
        while let Some(frame) = poll_fn(|cx| decoder.poll_frame(conn, cx)).await {
            match frame?.into_data() {
                Ok(data) => read.data.extend_from_slice(&data),
                Err(frame) => read.trailers = frame.into_trailers().ok(),
            }
        }
        assert!(decoder.is_done());
        Ok(read)
    }

    /// The response to a `method` request when the upstream sends `answer`
    /// and then closes: its head and body.
    async fn answer(method: Method, answer: &[u8]) -> Result<(Head, Read), Error> {
        let (mut conn, mut upstream) = pair().await;
        upstream.write_all(answer).await.unwrap();
        drop(upstream);
        let head = conn.read_head(&method).await?;
        let body = read_body(&mut conn, head.framing).await?;
        Ok((head, body))
    }

    async fn get(bytes: &[u8]) -> Result<(Head, Read), Error> {
        answer(Method::GET, bytes).await
    }

    fn framing_error(result: Result<(Head, Read), Error>) -> &'static str {
        match result {
            Err(Error::Framing(why)) => why,
            other => panic!("expected a framing error, got {other:?}"),
        }
    }

    #[test]
    fn a_request_head_has_its_method_target_and_headers_and_no_transfer_coding() {
        let req = Request::post("/a/b?c=d")
            .header("host", "agent:80")
            .header("x-k", "v1")
            .header("x-k", "v2")
            .header("transfer-encoding", "chunked")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(
            String::from_utf8(encode_head(&req)).unwrap(),
            "POST /a/b?c=d HTTP/1.1\r\nhost: agent:80\r\nx-k: v1\r\nx-k: v2\r\n\r\n"
        );
    }

    #[test]
    fn only_requests_without_a_body_or_upgrade_are_carried() {
        let plain = Request::get("/").body(Empty::<Bytes>::new()).unwrap();
        assert!(carries(&plain));
        let upgrade = Request::get("/")
            .header("upgrade", "websocket")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert!(!carries(&upgrade));
        let connect = Request::connect("agent:443")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert!(!carries(&connect));
        let body = Request::post("/")
            .body(http_body_util::Full::new(Bytes::from_static(b"x")))
            .unwrap();
        assert!(!carries(&body));
    }

    #[tokio::test]
    async fn a_length_body_arrives_whole_and_leaves_the_connection_reusable() {
        let (mut conn, mut upstream) = pair().await;
        for n in 0..3 {
            upstream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\nx-n: ")
                .await
                .unwrap();
            upstream
                .write_all(format!("{n}\r\n\r\nhello").as_bytes())
                .await
                .unwrap();
            let head = conn.read_head(&Method::GET).await.unwrap();
            assert_eq!(head.response.status(), StatusCode::OK);
            assert_eq!(head.response.headers()["x-n"], n.to_string().as_str());
            assert_eq!((head.framing, head.keep_alive), (Framing::Length(11), true));
            upstream.write_all(b" world").await.unwrap();
            let body = read_body(&mut conn, head.framing).await.unwrap();
            assert_eq!(body.data, b"hello world");
            assert!(conn.is_clean());
        }
    }

    #[tokio::test]
    async fn a_chunked_body_is_decoded_with_its_extensions_skipped_and_its_trailers_kept() {
        let (head, body) = get(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
              5;name=value\r\nhello\r\n6 ; x\r\n world\r\n0\r\nx-digest: abc\r\nx-n: 1\r\n\r\n")
        .await
        .unwrap();
        assert_eq!((head.framing, head.keep_alive), (Framing::Chunked, true));
        assert_eq!(body.data, b"hello world");
        let trailers = body.trailers.expect("trailers");
        assert_eq!(trailers["x-digest"], "abc");
        assert_eq!(trailers["x-n"], "1");
    }

    #[tokio::test]
    async fn informational_heads_are_skipped() {
        let (head, body) = get(b"HTTP/1.1 100 Continue\r\n\r\n\
              HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n\
              HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
        .await
        .unwrap();
        assert_eq!(head.response.status(), StatusCode::CREATED);
        assert!(!head.response.headers().contains_key("link"));
        assert_eq!(body.data, b"ok");
    }

    #[tokio::test]
    async fn head_204_and_304_answers_have_no_body_whatever_their_headers_say() {
        let (head, body) = answer(
            Method::HEAD,
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
        )
        .await
        .unwrap();
        assert_eq!((head.framing, head.keep_alive), (Framing::Empty, true));
        assert_eq!(head.response.headers()["content-length"], "10");
        assert!(body.data.is_empty());
        for status in ["204 No Content", "304 Not Modified"] {
            let (head, _) =
                get(format!("HTTP/1.1 {status}\r\ntransfer-encoding: chunked\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
            assert_eq!(head.framing, Framing::Empty, "{status}");
        }
    }

    #[tokio::test]
    async fn a_body_without_a_length_runs_to_the_close_and_ends_the_connection() {
        let (head, body) = get(b"HTTP/1.1 200 OK\r\n\r\nall of it").await.unwrap();
        assert_eq!((head.framing, head.keep_alive), (Framing::ToClose, false));
        assert_eq!(body.data, b"all of it");
        let (head, body) = get(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nzz")
            .await
            .unwrap();
        assert_eq!((head.framing, head.keep_alive), (Framing::ToClose, false));
        assert_eq!(body.data, b"zz");
    }

    #[tokio::test]
    async fn the_connection_is_not_reused_when_the_response_says_so_or_is_ambiguous() {
        let cases: [(&[u8], Framing); 4] = [
            (
                b"HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n",
                Framing::Empty,
            ),
            (
                b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\nx",
                Framing::Length(1),
            ),
            // A length beside a transfer coding: the coding frames the body.
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
                Framing::Chunked,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nfives",
                Framing::Length(5),
            ),
        ];
        for (bytes, framing) in cases {
            let (head, _) = get(bytes).await.unwrap();
            let text = String::from_utf8_lossy(bytes);
            assert_eq!(head.framing, framing, "{text}");
            let reusable = text.contains("5, 5");
            assert_eq!(head.keep_alive, reusable, "{text}");
        }
    }

    #[tokio::test]
    async fn ambiguous_or_broken_framing_is_refused() {
        let refused: [&[u8]; 9] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nfives",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nfives",
            b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nfives",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
            // A bare LF, a size with no digits, one too large, data without its CRLF.
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\nx\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n;x\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1xyz\r\nx\r\n0\r\n\r\n",
        ];
        for bytes in refused {
            framing_error(get(bytes).await);
        }
        let more: [&[u8]; 2] = [
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10000000000000000\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nxy0\r\n\r\n",
        ];
        for bytes in more {
            framing_error(get(bytes).await);
        }
        assert!(matches!(
            get(b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n").await,
            Err(Error::Head(_))
        ));
    }

    #[tokio::test]
    async fn a_close_before_the_head_is_unanswered_and_one_inside_the_body_is_an_error() {
        let unanswered = |result: Result<(Head, Read), Error>| matches!(result, Err(Error::Unanswered(e)) if e.kind() == io::ErrorKind::UnexpectedEof);
        assert!(unanswered(get(b"").await));
        assert!(unanswered(get(b"HTTP/1.1 200 OK\r\ncontent-le").await));
        assert!(unanswered(get(b"HTTP/1.1 100 Continue\r\n\r\n").await));
        for cut in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\nx-t: 1\r\n",
        ] {
            assert!(
                matches!(get(cut).await, Err(Error::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof),
                "{}",
                String::from_utf8_lossy(cut)
            );
        }
    }

    #[tokio::test]
    async fn a_head_past_the_limit_is_refused() {
        let (mut conn, mut upstream) = pair().await;
        let writer = tokio::spawn(async move {
            let _ = upstream.write_all(b"HTTP/1.1 200 OK\r\n").await;
            let field = format!("x-big: {}\r\n", "y".repeat(1000));
            for _ in 0..100 {
                if upstream.write_all(field.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        assert!(matches!(
            conn.read_head(&Method::GET).await,
            Err(Error::HeadTooLarge)
        ));
        drop(conn);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_connection_is_stale_once_the_upstream_closes_or_speaks() {
        let (conn, upstream) = pair().await;
        assert!(!conn.is_stale());
        drop(upstream);
        crate::upstream::tests::wait_until("the close is seen", || conn.is_stale()).await;

        let (conn, mut upstream) = pair().await;
        assert!(!conn.is_stale());
        upstream
            .write_all(b"HTTP/1.1 408 Timeout\r\n\r\n")
            .await
            .unwrap();
        crate::upstream::tests::wait_until("the bytes are seen", || conn.is_stale()).await;
    }

    /// `body` sent chunked, in chunks of the given sizes (cycled), then trailers.
    fn chunked(body: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        let mut rest = body;
        for &size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, after) = rest.split_at(size.min(rest.len()));
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
            rest = after;
        }
        out.extend_from_slice(b"0\r\nx-end: yes\r\n\r\n");
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// However a chunked answer is cut into chunks, and however the
        /// network splits its bytes, the same body and trailers come out
        /// and the connection is left clean for the next answer.
        #[test]
        fn a_chunked_body_survives_any_split(
            body in proptest::collection::vec(any::<u8>(), 0..3000),
            sizes in proptest::collection::vec(1usize..700, 1..6),
            cuts in proptest::collection::vec(1usize..400, 1..40),
        ) {
            let wire = chunked(&body, &sizes);
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (read, clean) = runtime.block_on(async {
                let (mut conn, mut upstream) = pair().await;
                let writer = tokio::spawn(async move {
                    let mut rest = &wire[..];
                    for &cut in cuts.iter().cycle() {
                        if rest.is_empty() {
                            break;
                        }
                        let (piece, after) = rest.split_at(cut.min(rest.len()));
                        upstream.write_all(piece).await.unwrap();
                        upstream.flush().await.unwrap();
                        tokio::task::yield_now().await;
                        rest = after;
                    }
                    upstream
                });
                let head = conn.read_head(&Method::GET).await.unwrap();
                let read = read_body(&mut conn, head.framing).await.unwrap();
                let _upstream = writer.await.unwrap();
                (read, conn.is_clean())
            });
            prop_assert_eq!(&read.data, &body);
            prop_assert_eq!(read.trailers.as_ref().map(|t| t["x-end"].clone()), Some(HeaderValue::from_static("yes")));
            prop_assert!(clean);
        }
    }
}
