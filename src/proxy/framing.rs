//! The client connection's framing guard: refuses request smuggling that
//! hyper would silently resolve.
//!
//! Owns: [`FramingGuard`], an IO wrapper that follows HTTP/1.1 message
//! framing on the bytes hyper reads from a client (request heads, then
//! bodies by `Content-Length` or chunked coding, pipelined), and
//! [`AmbiguousFraming`], the per-connection flag it raises. hyper follows
//! RFC 9112 and lets `Transfer-Encoding` win over `Content-Length`, removing
//! the latter from the header map, so the request handler cannot see that a
//! request carried both; the guard sees the raw head first. Does not own:
//! parsing requests for real (hyper) or answering the refused request
//! (`rewrite::check_request`).

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::listener::MAX_HEAD_BYTES;

/// Header slots per head: hyper's default limit (`http1().max_headers`),
/// which the listener keeps. A head with more is refused by hyper with 431.
const MAX_HEADERS: usize = 100;

/// What an HTTP/2 client with prior knowledge sends first.
pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const CLEAR: u8 = 0;
const BOTH_LENGTHS: u8 = 1;
const LOST: u8 = 2;

/// Raised, before hyper reads the bytes, when a connection's requests
/// cannot be framed one way only: a head carries both `Content-Length` and
/// `Transfer-Encoding`, or the guard lost track of the framing on bytes
/// hyper might still accept (see `Sniffer`). Every request hyper hands on
/// from that connection must then be refused. A cheap clone of a shared flag.
///
/// Because the guard sees bytes when they are read and hyper handles the
/// requests in them one after another, the requests pipelined in the same
/// read before the offending head are refused too. They come from a client
/// that is smuggling or broken, so this is accepted.
#[derive(Clone, Debug, Default)]
pub struct AmbiguousFraming(Arc<AtomicU8>);

impl AmbiguousFraming {
    #[must_use]
    pub fn new() -> AmbiguousFraming {
        AmbiguousFraming::default()
    }

    /// Why a request on this connection must be refused, if it must.
    #[must_use]
    pub fn refusal(&self) -> Option<&'static str> {
        match self.0.load(Ordering::Acquire) {
            CLEAR => None,
            BOTH_LENGTHS => {
                Some("a request must not carry both content-length and transfer-encoding")
            }
            _ => Some("the request framing on this connection cannot be followed"),
        }
    }

    /// Records why; the first reason stays.
    fn raise(&self, reason: u8) {
        let _ = self
            .0
            .compare_exchange(CLEAR, reason, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Wraps a client connection and watches the bytes read from it. Reads and
/// writes pass through unchanged, upgraded and HTTP/2 connections included.
#[derive(Debug)]
pub struct FramingGuard<T> {
    io: T,
    sniffer: Sniffer,
}

impl<T> FramingGuard<T> {
    #[must_use]
    pub fn new(io: T) -> FramingGuard<T> {
        FramingGuard {
            io,
            sniffer: Sniffer::new(AmbiguousFraming::new()),
        }
    }

    /// The flag this guard raises, for the connection's request handler.
    #[must_use]
    pub fn framing(&self) -> AmbiguousFraming {
        self.sniffer.flag.clone()
    }

    /// Whether the bytes read so far end exactly after a request (its head
    /// and body), so nothing of a next request has arrived yet. False once
    /// the guard stopped watching, and after a head that may upgrade.
    #[must_use]
    pub fn between_requests(&self) -> bool {
        self.sniffer.between_requests()
    }

    /// Whether a request head has begun and not ended: part of it has been
    /// read, or a head that may upgrade the connection was the last one
    /// and its upgrade has not been declined ([`Self::upgrade_declined`]).
    /// Not while a body is read.
    #[must_use]
    pub fn in_head(&self) -> bool {
        self.sniffer.in_head()
    }

    /// Says that the upgrade the last head asked for was declined (its
    /// answer was no `101`): hyper reads the next request from here, so the
    /// guard expects one too.
    pub fn upgrade_declined(&mut self) {
        self.sniffer.upgrade = false;
    }

    /// The wrapped connection.
    #[must_use]
    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        this.sniffer
            .feed(buf.filled().get(before..).unwrap_or_default());
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Where the client->proxy byte stream is, in hyper's reading of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Expecting a request head (part of it may be in `Sniffer::head`).
    Head,
    /// Inside a body of this many more bytes.
    Length(u64),
    Chunked(Chunk),
    /// Not watching any more: everything passes through.
    Off,
}

/// A chunked body, byte by byte as hyper's decoder reads it (including its
/// leniencies: white space after the size, bare `\n` inside trailer lines).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    Start,
    Size(u64),
    SizeSpace(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

enum Step {
    Next(Chunk),
    Done,
    Invalid,
}

impl Chunk {
    /// The state after `byte`; never called in `Data`, which is skipped whole.
    fn next(self, byte: u8) -> Step {
        use Chunk::*;
        let hex = char::from(byte).to_digit(16).map(u64::from);
        let next = match (self, byte) {
            (Start, _) => hex.map(Size),
            (Size(size), _) if hex.is_some() => size
                .checked_mul(16)
                .and_then(|size| size.checked_add(hex.unwrap_or_default()))
                .map(Size),
            (Size(size) | SizeSpace(size), b' ' | b'\t') => Some(SizeSpace(size)),
            (Size(size) | SizeSpace(size), b';') => Some(Extension(size)),
            (Size(size) | SizeSpace(size) | Extension(size), b'\r') => Some(SizeLf(size)),
            (Extension(_), b'\n') => None,
            (Extension(size), _) => Some(Extension(size)),
            (SizeLf(0), b'\n') => Some(EndCr),
            (SizeLf(size), b'\n') => Some(Data(size)),
            (DataCr, b'\r') => Some(DataLf),
            (DataLf, b'\n') => Some(Start),
            (Trailer, b'\r') => Some(TrailerLf),
            (Trailer, _) => Some(Trailer),
            (TrailerLf, b'\n') => Some(EndCr),
            (EndCr, b'\r') => Some(EndLf),
            (EndCr, _) => Some(Trailer),
            (EndLf, b'\n') => return Step::Done,
            _ => None,
        };
        next.map_or(Step::Invalid, Step::Next)
    }
}

/// How a parsed head frames what follows it.
enum Head {
    Body {
        length: Length,
        /// hyper may hand the connection over after this request.
        upgrade: bool,
    },
    /// Both `Content-Length` and `Transfer-Encoding`.
    Ambiguous,
    /// A head hyper refuses (and then closes the connection).
    Invalid,
}

enum Length {
    Fixed(u64),
    Chunked,
}

enum Parsed {
    Complete(usize, Head),
    Partial,
    Invalid,
}

/// The framing state machine, fed every byte read from the client.
///
/// It never fails: when the bytes stop making sense it stops watching and
/// lets them through for hyper to refuse. Because a request it cannot
/// follow but hyper could would slip past unchecked, stopping also raises
/// the flag, except where hyper has no more HTTP/1 requests to parse: the
/// HTTP/2 preface, and the bytes right after a head that may upgrade the
/// connection (tunnelled bytes are no HTTP). If an upgrade is declined,
/// hyper reads the next request, and so does the guard; told so, it also
/// sees the connection between requests again.
#[derive(Debug)]
struct Sniffer {
    state: State,
    /// A request head that has not fully arrived; empty while heads arrive whole.
    head: Vec<u8>,
    /// No head has been parsed yet: the HTTP/2 preface may come.
    first: bool,
    /// The last head may have upgraded the connection.
    upgrade: bool,
    flag: AmbiguousFraming,
}

impl Sniffer {
    fn new(flag: AmbiguousFraming) -> Sniffer {
        Sniffer {
            state: State::Head,
            head: Vec::new(),
            first: true,
            upgrade: false,
            flag,
        }
    }

    fn between_requests(&self) -> bool {
        self.state == State::Head && self.head.is_empty() && !self.upgrade
    }

    fn in_head(&self) -> bool {
        self.state == State::Head && (!self.head.is_empty() || self.upgrade)
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            bytes = match self.state {
                State::Off => return,
                State::Head => self.read_head(bytes),
                State::Length(left) => {
                    let (skipped, rest) = skip(left, bytes);
                    self.state = match left - skipped {
                        0 => State::Head,
                        left => State::Length(left),
                    };
                    rest
                }
                State::Chunked(chunk) => self.read_chunked(chunk, bytes),
            };
        }
    }

    /// Reads (part of) a head, in place when it arrives whole.
    fn read_head<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        if self.head.is_empty() {
            return match parse(bytes) {
                Parsed::Complete(len, head) => {
                    self.on_head(head);
                    bytes.get(len..).unwrap_or_default()
                }
                Parsed::Partial if bytes.len() <= MAX_HEAD_BYTES => {
                    self.head.extend_from_slice(bytes);
                    &[]
                }
                Parsed::Partial => self.stop(false),
                Parsed::Invalid => self.stop(self.first && is_h2_preface(bytes)),
            };
        }
        let old = self.head.len();
        let take = bytes.len().min((MAX_HEAD_BYTES + 1).saturating_sub(old));
        self.head.extend_from_slice(&bytes[..take]);
        // Like hyper, parse again only once the new bytes may end the head.
        let parsed = if may_end_head(&self.head, old) {
            parse(&self.head)
        } else {
            Parsed::Partial
        };
        match parsed {
            Parsed::Complete(len, head) => {
                self.head.clear();
                if self.head.capacity() > 4096 {
                    self.head = Vec::new();
                }
                match len.checked_sub(old).and_then(|used| bytes.get(used..)) {
                    Some(rest) => {
                        self.on_head(head);
                        rest
                    }
                    None => self.stop(false),
                }
            }
            Parsed::Partial if self.head.len() <= MAX_HEAD_BYTES => &[],
            // Too large: hyper answers 431.
            Parsed::Partial => self.stop(false),
            Parsed::Invalid => {
                let h2 = self.first && is_h2_preface(&self.head);
                self.stop(h2)
            }
        }
    }

    fn on_head(&mut self, head: Head) {
        self.first = false;
        match head {
            Head::Ambiguous => {
                tracing::debug!("request head carries both content-length and transfer-encoding");
                self.flag.raise(BOTH_LENGTHS);
                // hyper closes the connection after answering it.
                self.state = State::Off;
            }
            Head::Invalid => {
                self.stop(false);
            }
            Head::Body { length, upgrade } => {
                self.upgrade = upgrade;
                self.state = match length {
                    Length::Fixed(0) => State::Head,
                    Length::Fixed(len) => State::Length(len),
                    Length::Chunked => State::Chunked(Chunk::Start),
                };
            }
        }
    }

    fn read_chunked<'a>(&mut self, mut chunk: Chunk, mut bytes: &'a [u8]) -> &'a [u8] {
        while let Some((&byte, rest)) = bytes.split_first() {
            if let Chunk::Data(left) = chunk {
                let (skipped, rest) = skip(left, bytes);
                chunk = match left - skipped {
                    0 => Chunk::DataCr,
                    left => Chunk::Data(left),
                };
                bytes = rest;
                continue;
            }
            bytes = rest;
            match chunk.next(byte) {
                Step::Next(next) => chunk = next,
                Step::Done => {
                    self.state = State::Head;
                    return bytes;
                }
                // hyper fails the body and closes the connection.
                Step::Invalid => return self.stop(false),
            }
        }
        self.state = State::Chunked(chunk);
        bytes
    }

    /// Stops watching for good; raises the flag unless hyper is done with
    /// HTTP/1 requests on this connection (see the type's doc).
    fn stop(&mut self, h2: bool) -> &'static [u8] {
        if !h2 && !self.upgrade {
            tracing::debug!("request framing lost; refusing the connection's requests");
            self.flag.raise(LOST);
        }
        self.state = State::Off;
        self.head = Vec::new();
        &[]
    }
}

/// Splits off up to `left` bytes: how many, and the rest.
fn skip(left: u64, bytes: &[u8]) -> (u64, &[u8]) {
    let n = usize::try_from(left).map_or(bytes.len(), |left| left.min(bytes.len()));
    let (_, rest) = bytes.split_at(n);
    (n as u64, rest)
}

/// Parses a request head the way hyper does (same parser, same settings).
fn parse(bytes: &[u8]) -> Parsed {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        bytes,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) => Parsed::Complete(len, framing(&req)),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(_) => Parsed::Invalid,
    }
}

/// How hyper frames the body of `req` (`hyper::proto::h1::role`, `Server::parse`).
fn framing(req: &httparse::Request<'_, '_>) -> Head {
    let http11 = req.version == Some(1);
    let mut upgrade = req.method == Some("CONNECT");
    let mut transfer_encoding = false;
    let mut chunked = false;
    let mut content_length = false;
    let mut length = None;
    let mut bad_length = false;
    for header in req.headers.iter() {
        let name = header.name.as_bytes();
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding = true;
            // Each line decides anew: the last one must end in `chunked`.
            chunked = ends_in_chunked(header.value);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            content_length = true;
            match (digits(header.value), length) {
                (None, _) => bad_length = true,
                (Some(len), None) => length = Some(len),
                (Some(len), Some(first)) => bad_length |= len != first,
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade |= http11;
        }
    }
    match (content_length, transfer_encoding) {
        (true, true) => Head::Ambiguous,
        (false, true) if http11 && chunked => Head::Body {
            length: Length::Chunked,
            upgrade,
        },
        (_, true) => Head::Invalid,
        (_, false) if bad_length => Head::Invalid,
        (_, false) => Head::Body {
            length: Length::Fixed(length.unwrap_or(0)),
            upgrade,
        },
    }
}

/// `Content-Length` as hyper reads it: decimal digits only, no sign, no list.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
            .flatten()
    })
}

/// Whether the last coding of a `Transfer-Encoding` value is `chunked`; like
/// hyper, a value that is not visible ASCII is not.
fn ends_in_chunked(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
        && value
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Whether `head` may hold an empty line (the end of a head) that was not
/// there before its first `old` bytes were joined by more.
fn may_end_head(head: &[u8], old: usize) -> bool {
    head.get(old.saturating_sub(2)..)
        .unwrap_or_default()
        .windows(2)
        .any(|w| w == b"\n\n" || w == b"\n\r")
}

/// Whether `bytes` begin the HTTP/2 preface (or are a prefix of it).
fn is_h2_preface(bytes: &[u8]) -> bool {
    bytes.iter().zip(H2_PREFACE).all(|(a, b)| a == b)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::{BodyExt as _, Empty};
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    const BOTH: Option<&str> =
        Some("a request must not carry both content-length and transfer-encoding");
    const LOST_TRACK: Option<&str> =
        Some("the request framing on this connection cannot be followed");

    #[derive(Debug, PartialEq)]
    struct Outcome {
        refusal: Option<&'static str>,
        state: State,
    }

    fn run(reads: &[&[u8]]) -> Sniffer {
        let mut sniffer = Sniffer::new(AmbiguousFraming::new());
        for read in reads {
            sniffer.feed(read);
        }
        sniffer
    }

    fn outcome_of(sniffer: &Sniffer) -> Outcome {
        Outcome {
            refusal: sniffer.flag.refusal(),
            state: sniffer.state,
        }
    }

    /// The outcome of `bytes`, checked to be the same whether they arrive in
    /// one read, in two split at every position, or one byte at a time.
    fn outcome(bytes: &[u8]) -> Outcome {
        let whole = outcome_of(&run(&[bytes]));
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            assert_eq!(outcome_of(&run(&[a, b])), whole, "split at {at}");
        }
        let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(outcome_of(&run(&bytewise)), whole, "byte by byte");
        whole
    }

    fn clean(state: State) -> Outcome {
        Outcome {
            refusal: None,
            state,
        }
    }

    const CLEAN_PIPELINE: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 49\r\n\r\n\
        Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n\
        POST /b HTTP/1.1\r\nHost: x\r\ntransfer-encoding: gzip, Chunked \r\n\r\n\
        4;name=value;quoted=\"a b\"\r\nwxyz\r\n31 \t;ext\r\n\
        Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n\r\n\
        0\r\nx-checksum: 1\r\nx-more: 2\r\n\r\n\
        \r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n\
        POST /d HTTP/1.0\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc";

    #[test]
    fn clean_pipelined_bodies_are_skipped_by_their_framing() {
        assert_eq!(outcome(CLEAN_PIPELINE), clean(State::Head));
        // Mid-body, the guard knows where it is.
        let cut = CLEAN_PIPELINE.len() - 2;
        assert_eq!(
            outcome_of(&run(&[&CLEAN_PIPELINE[..cut]])),
            clean(State::Length(2))
        );
    }

    #[test]
    fn heads_that_arrive_whole_are_not_buffered() {
        let sniffer = run(&[CLEAN_PIPELINE]);
        assert_eq!(sniffer.head.capacity(), 0);
        let mut sniffer = run(&[b"GET / HTTP/1.1\r\n"]);
        assert!(!sniffer.head.is_empty(), "a partial head is kept");
        sniffer.feed(b"Host: x\r\n\r\n");
        assert!(sniffer.head.is_empty());
        assert_eq!(sniffer.state, State::Head);
    }

    #[test]
    fn both_lengths_raise_the_flag_in_either_order() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-LENGTH: 0\r\nHost: x\r\ntransfer-ENCODING: gzip\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        ] {
            let mut bytes = head.to_vec();
            bytes.extend_from_slice(b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n");
            let text = String::from_utf8_lossy(head);
            assert_eq!(
                outcome(&bytes),
                Outcome {
                    refusal: BOTH,
                    state: State::Off
                },
                "{text}"
            );
        }
    }

    #[test]
    fn a_smuggling_head_after_clean_requests_raises_the_flag() {
        let mut bytes = CLEAN_PIPELINE.to_vec();
        bytes.extend_from_slice(
            b"POST /e HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        );
        assert_eq!(outcome(&bytes).refusal, BOTH);
    }

    #[test]
    fn between_requests_only_when_no_part_of_a_request_is_pending() {
        let between = |reads: &[&[u8]]| run(reads).between_requests();
        assert!(between(&[]));
        assert!(between(&[b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"]));
        assert!(between(&[
            b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\nab"
        ]));
        assert!(!between(&[b"GET / HTTP/1.1\r\nhost"]), "half a head");
        assert!(
            !between(&[b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\na"]),
            "half a body"
        );
        assert!(
            !between(&[b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n"]),
            "an unfinished chunked body"
        );
        assert!(
            !between(&[b"GET / HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"]),
            "an upgrade may follow"
        );
        assert!(
            !between(&[b"\x00garbage\r\n\r\n"]),
            "the guard stopped watching"
        );
    }

    #[test]
    fn an_upgraded_connection_passes_through() {
        let mut bytes =
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                .to_vec();
        // A masked WebSocket text frame, then more tunnelled bytes.
        bytes.extend_from_slice(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51]);
        bytes.extend_from_slice(
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(outcome(&bytes), clean(State::Off));
    }

    #[test]
    fn a_declined_upgrade_keeps_watching() {
        // The upstream may refuse the upgrade; hyper then reads the next request.
        let bytes = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\
            POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(outcome(bytes).refusal, BOTH);
    }

    #[test]
    fn the_h2_preface_passes_through() {
        let mut bytes = H2_PREFACE.to_vec();
        // A SETTINGS frame, then bytes that would look like HTTP/1.
        bytes.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
        bytes.extend_from_slice(
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(outcome(&bytes), clean(State::Off));
    }

    #[test]
    fn garbage_stops_the_guard_and_marks_the_connection() {
        let lost = Outcome {
            refusal: LOST_TRACK,
            state: State::Off,
        };
        for bytes in [
            &b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello",
            b"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;a\nb\r\nabc\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000000\r\n\r\n",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
        ] {
            let text = String::from_utf8_lossy(bytes);
            assert_eq!(outcome(bytes), lost, "{text}");
        }
        // Garbage seen whole is refused at once.
        assert_eq!(outcome_of(&run(&[b"\x16\x03\x01\x00\xa5\x01"])), lost);
    }

    #[test]
    fn an_oversized_head_stops_the_guard() {
        let mut head = b"GET / HTTP/1.1\r\nx-big: ".to_vec();
        head.resize(MAX_HEAD_BYTES + 10, b'a');
        let (a, b) = head.split_at(100);
        assert_eq!(
            outcome_of(&run(&[a, b])),
            Outcome {
                refusal: LOST_TRACK,
                state: State::Off
            }
        );
    }

    #[tokio::test]
    async fn the_guard_passes_bytes_through_both_ways() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut guard = FramingGuard::new(server);
        let framing = guard.framing();
        let request: &[u8] =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc\x00\xff";
        let writer = tokio::spawn(async move {
            client
                .write_all(request)
                .await
                .expect("write to the duplex");
            client.shutdown().await.expect("shut down the duplex");
            let mut answer = Vec::new();
            client
                .read_to_end(&mut answer)
                .await
                .expect("read the answer");
            answer
        });
        let mut read = Vec::new();
        guard
            .read_to_end(&mut read)
            .await
            .expect("read through the guard");
        assert_eq!(read, request);
        assert_eq!(framing.refusal(), BOTH);
        guard
            .write_all(b"answer")
            .await
            .expect("write through the guard");
        guard.shutdown().await.expect("shut down the guard");
        drop(guard);
        assert_eq!(writer.await.expect("the writer ends"), b"answer");
    }

    /// Serves one connection with hyper behind the guard; the service answers
    /// 400 when the flag is up and says whether it saw `content-length`.
    async fn serve_one(listener: TcpListener) {
        let (stream, _) = listener.accept().await.expect("accept");
        let stream = FramingGuard::new(stream);
        let framing = stream.framing();
        let service = service_fn(move |req: Request<Incoming>| {
            let framing = framing.clone();
            async move {
                let refused = framing.refusal().is_some();
                let saw_length = req.headers().contains_key(http::header::CONTENT_LENGTH);
                if !refused {
                    req.into_body()
                        .collect()
                        .await
                        .expect("read the request body");
                }
                let mut rsp = Response::new(Empty::<Bytes>::new());
                *rsp.status_mut() = if refused {
                    StatusCode::BAD_REQUEST
                } else {
                    StatusCode::OK
                };
                rsp.headers_mut().insert(
                    "x-saw-length",
                    saw_length.to_string().parse().expect("bool"),
                );
                Ok::<_, Infallible>(rsp)
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
    }

    /// Sends `request` and reads one response head: its status line and headers.
    async fn exchange(stream: &mut TcpStream, request: &[u8]) -> String {
        stream.write_all(request).await.expect("send the request");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
                .await
                .expect("a response within the deadline")
                .expect("read the response");
            assert_eq!(read, 1, "connection closed after {head:?}");
            head.push(byte[0]);
        }
        String::from_utf8(head).expect("an ASCII head")
    }

    #[tokio::test]
    async fn hyper_behind_the_guard_sees_the_flag_hyper_alone_would_hide() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let server = tokio::spawn(serve_one(listener));
        let mut stream = TcpStream::connect(addr).await.expect("connect");

        let head = exchange(
            &mut stream,
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 49\r\n\r\n\
              Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let head = exchange(
            &mut stream,
            b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
              3;x=y\r\nabc\r\n0\r\nx-trailer: 1\r\n\r\n",
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let head = exchange(
            &mut stream,
            b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
              0\r\n\r\n",
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
        // hyper removed the header: the handler could not have told on its own.
        assert!(head.contains("x-saw-length: false"), "{head}");
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("hyper closes the connection")
            .expect("the server task ends");
    }

    const FRAGMENTS: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\n",
        b"POST /x HTTP/1.0\r\n",
        b"Host: x\r\n",
        b"Content-Length: 3\r\n",
        b"content-length: 0\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Upgrade: websocket\r\nConnection: upgrade\r\n",
        b"\r\n",
        b"\n",
        b"abc",
        b"3;e=1\r\n",
        b"0\r\n",
        b"x-t: 1\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x81\x00",
        b"POST /both HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        b"POST /both HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
        // Whole messages, so that long valid sequences are common.
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"POST /both HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ];

    /// Feeds `bytes` to hyper behind the guard; whether hyper handed the
    /// service a `/both` request (one carrying both lengths) with the flag down.
    fn hyper_lets_both_through(bytes: Vec<u8>) -> bool {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let bypass = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = Arc::clone(&bypass);
        runtime.block_on(async move {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let stream = FramingGuard::new(server);
            let framing = stream.framing();
            let service = service_fn(move |req: Request<Incoming>| {
                let framing = framing.clone();
                let seen = Arc::clone(&seen);
                async move {
                    let refused = framing.refusal().is_some();
                    if req.uri().path() == "/both" && !refused {
                        seen.store(true, Ordering::Relaxed);
                    }
                    let status = if refused {
                        StatusCode::BAD_REQUEST
                    } else {
                        let _ = req.into_body().collect().await;
                        StatusCode::OK
                    };
                    let mut rsp = Response::new(Empty::<Bytes>::new());
                    *rsp.status_mut() = status;
                    Ok::<_, Infallible>(rsp)
                }
            });
            let serve = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            let talk = async move {
                client.write_all(&bytes).await.expect("write to the duplex");
                client.shutdown().await.expect("shut down the duplex");
                let mut answers = Vec::new();
                let _ = client.read_to_end(&mut answers).await;
            };
            let both = async { tokio::join!(serve, talk) };
            // hyper may end the connection with an error; only the requests matter.
            let _ = tokio::time::timeout(Duration::from_secs(10), both)
                .await
                .expect("hyper finishes the connection");
        });
        bypass.load(Ordering::Relaxed)
    }

    fn split_agrees(bytes: &[u8], at: prop::sample::Index) -> Result<(), TestCaseError> {
        let (a, b) = bytes.split_at(at.index(bytes.len() + 1));
        let whole = outcome_of(&run(&[bytes]));
        prop_assert_eq!(outcome_of(&run(&[a, b])), whole);
        Ok(())
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600), at: prop::sample::Index) {
            let (a, b) = bytes.split_at(at.index(bytes.len() + 1));
            let _ = run(&[a, b]);
            let _ = run(&[&bytes]);
        }

        /// Like hyper, the guard re-parses a buffered head only once it may
        /// be complete, so inputs that end a head agree however they are split.
        #[test]
        fn http_like_bytes_agree_however_split(
            parts in prop::collection::vec(prop::sample::select(FRAGMENTS), 0..24),
            at: prop::sample::Index,
        ) {
            let mut bytes = parts.concat();
            bytes.extend_from_slice(b"\r\n\r\n");
            split_agrees(&bytes, at)?;
        }

        /// Whatever precedes it, a request with both lengths that hyper
        /// parses never reaches the service with the flag down.
        #[test]
        fn hyper_never_sees_both_lengths_unflagged(
            parts in prop::collection::vec(prop::sample::select(FRAGMENTS), 0..24),
        ) {
            let mut bytes = parts.concat();
            bytes.extend_from_slice(b"\r\n\r\n");
            prop_assert!(!hyper_lets_both_through(bytes));
        }
    }
}
