//! What the listener needs to free an idle HTTP/1.1 connection's buffers,
//! and to see a client that has stopped reading.
//!
//! hyper keeps a connection's read buffer (8 KiB) and write buffer for as
//! long as it serves the connection, and has no setting to release them
//! while the connection waits for its next request. The listener therefore
//! takes the socket back from hyper once a connection has been idle for a
//! while, waits for the next request holding nothing but the socket, and
//! then serves it with a fresh hyper connection.
//!
//! Owns:
//! - [`ClientIo`]: the client connection as hyper reads and writes it,
//!   behind the framing guard, with the bytes hyper had read but not parsed
//!   served again first.
//! - [`Activity`]: what the connection's task reads to tell that hyper is
//!   idle (bytes moved, open requests, whether the bytes read so far end
//!   between two requests) or that a write is waiting for the client to
//!   read, whether an HTTP/2 client resets most of its streams before
//!   their answer, and whether a drain has the next response close the
//!   connection.
//! - [`OpenRequest`] and [`Tracked`]: keep a request counted open until
//!   hyper drops its response body, and count it abandoned if it never got
//!   one.
//! - [`Upgrading`]: marks an upgrade request waiting for its answer, so
//!   that a drain does not start under it.
//! - [`Activity::decline_upgrade`]: tells the guard an upgrade was
//!   declined, so that the connection is idle again, not in a head, once
//!   its answer is out.
//!
//! Does not own: when to take a socket back or give up on a client, or the
//! serving loop (`listener`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::framing::{AmbiguousFraming, FramingGuard};
use crate::coalesce;

/// One client connection's activity, written by its [`ClientIo`] and
/// [`Tracked`] bodies (inside hyper) and read by the connection's task
/// between polls of hyper. Over HTTP/1.1 all of it happens on that one
/// task, so relaxed ordering is enough (the atomics only make it `Sync`).
/// HTTP/2 connections, whose streams run on tasks of their own, are never
/// taken back; their idle close and send timeout read the counts only to
/// see whether anything moved, is open or waits, and each worker's runtime
/// runs on one thread.
#[derive(Debug)]
pub struct Activity {
    /// Reads that moved bytes.
    reads: AtomicU64,
    /// Writes that moved bytes.
    writes: AtomicU64,
    /// One more than `writes` as it was when a write last found the socket
    /// full (0 for never): equal to `writes + 1` for as long as the client
    /// has taken nothing since.
    blocked_at: AtomicU64,
    /// Requests started so far.
    requests: AtomicU64,
    /// Requests whose response body hyper has not dropped yet.
    open_requests: AtomicUsize,
    /// Of those, the ones whose response head hyper has taken (and
    /// written): a `connection: close` can no longer go in it.
    answered_requests: AtomicUsize,
    /// Requests whose client gave up on them before their response head:
    /// on HTTP/2, streams it reset (see [`Activity::resets_most_streams`]).
    abandoned: AtomicU64,
    /// The last read ended between two requests.
    between_requests: AtomicBool,
    /// The last read ended inside a request head.
    in_head: AtomicBool,
    /// Set while the socket is being taken back: hyper's closing
    /// `shutdown` must not reach it.
    keep_open: AtomicBool,
    /// An upgrade request is waiting for its response head. A drain must
    /// not start under it: hyper would send the `101` with `connection:
    /// upgrade, close`, and clients refuse that switch.
    upgrading: AtomicBool,
    /// The last request asked for an upgrade and was answered without
    /// one, and the guard has not been told yet.
    upgrade_declined: AtomicBool,
    /// A drain is due: the next response says `connection: close`, and
    /// hyper closes the connection behind it.
    close_after_response: AtomicBool,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            blocked_at: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            open_requests: AtomicUsize::new(0),
            answered_requests: AtomicUsize::new(0),
            abandoned: AtomicU64::new(0),
            between_requests: AtomicBool::new(true),
            in_head: AtomicBool::new(false),
            keep_open: AtomicBool::new(false),
            upgrading: AtomicBool::new(false),
            upgrade_declined: AtomicBool::new(false),
            close_after_response: AtomicBool::new(false),
        }
    }

    /// A count that changes whenever bytes are read from or written to the client.
    #[must_use]
    pub fn transfers(&self) -> u64 {
        self.reads
            .load(Ordering::Relaxed)
            .wrapping_add(self.writes.load(Ordering::Relaxed))
    }

    /// A count that changes whenever bytes are written to the client.
    #[must_use]
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Whether a write is waiting for the client to take bytes: the last
    /// one found the socket full and none has moved bytes since.
    #[must_use]
    pub fn is_write_blocked(&self) -> bool {
        self.blocked_at.load(Ordering::Relaxed) == self.writes().wrapping_add(1)
    }

    /// How many requests the connection has started.
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Whether a request's response body is still open (a stream, say).
    #[must_use]
    pub fn has_open_requests(&self) -> bool {
        self.open_requests.load(Ordering::Relaxed) > 0
    }

    /// Whether a request is open whose response head hyper has yet to
    /// take: closing the connection now puts `connection: close` in it.
    #[must_use]
    pub fn awaits_answer(&self) -> bool {
        self.open_requests.load(Ordering::Relaxed) > self.answered_requests.load(Ordering::Relaxed)
    }

    /// No request is open and no part of a next one has been read. (hyper
    /// may still be flushing the last response: the caller also wants no
    /// transfers for a while.)
    #[must_use]
    pub fn is_between_requests(&self) -> bool {
        !self.has_open_requests() && self.between_requests.load(Ordering::Relaxed)
    }

    /// No request is open and a head has begun (see
    /// [`FramingGuard::in_head`]): the client is sending its next head.
    #[must_use]
    pub fn is_reading_head(&self) -> bool {
        !self.has_open_requests() && self.in_head.load(Ordering::Relaxed)
    }

    /// Makes the connection's `shutdown` a no-op (`true`), so that hyper,
    /// told to end an idle connection, leaves the socket open for
    /// `into_parts`; or lets it through again (`false`).
    pub fn keep_open(&self, keep: bool) {
        self.keep_open.store(keep, Ordering::Relaxed);
    }

    /// Whether an upgrade request is waiting for its response head.
    #[must_use]
    pub fn is_upgrading(&self) -> bool {
        self.upgrading.load(Ordering::Relaxed)
    }

    /// Marks an upgrade request as waiting for its response head until the
    /// returned guard is dropped. (HTTP/1.1 serves one request at a time.)
    #[must_use]
    pub fn upgrading(self: &Arc<Self>) -> Upgrading {
        self.upgrading.store(true, Ordering::Relaxed);
        Upgrading(Arc::clone(self))
    }

    /// Says that the request just answered asked for an upgrade (any
    /// `Upgrade` header) and got none: the framing guard, which had stopped
    /// expecting a next head after it, learns so at the connection's next
    /// read, which hyper makes as soon as the answer is out. Until then
    /// the connection reads as in a head: not idle, and timed by
    /// `header_read_timeout`.
    pub fn decline_upgrade(&self) {
        self.upgrade_declined.store(true, Ordering::Relaxed);
    }

    /// Has the next response close the connection behind it (a drain).
    pub fn close_after_response(&self) {
        self.close_after_response.store(true, Ordering::Relaxed);
    }

    /// Whether a response is to say `connection: close` (see
    /// [`Activity::close_after_response`]).
    #[must_use]
    pub fn closes_after_response(&self) -> bool {
        self.close_after_response.load(Ordering::Relaxed)
    }

    /// Counts a request open until the returned guard is dropped.
    #[must_use]
    pub fn open_request(self: &Arc<Self>) -> OpenRequest {
        self.open_requests.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        OpenRequest {
            activity: Arc::clone(self),
            answered: false,
        }
    }

    /// Whether the client resets most of the streams it opens before their
    /// answer: a rapid reset (CVE-2023-44487) paced to pass h2's own guard,
    /// which counts only streams reset before hyper takes them. Each one
    /// costs an upstream request, and over HTTP/1.1 an upstream connection.
    /// Envoy's rule: more than half of at least [`RESET_STREAMS_JUDGED`].
    #[must_use]
    pub fn resets_most_streams(&self) -> bool {
        let requests = self.requests();
        requests >= RESET_STREAMS_JUDGED && self.abandoned.load(Ordering::Relaxed) * 2 > requests
    }
}

/// An upgrade request waiting for its response head, until dropped.
#[derive(Debug)]
pub struct Upgrading(Arc<Activity>);

impl Drop for Upgrading {
    fn drop(&mut self) {
        self.0.upgrading.store(false, Ordering::Relaxed);
    }
}

/// How many streams a connection must have opened before the share its
/// client reset is judged (Envoy's `premature_reset_total_stream_count`).
pub const RESET_STREAMS_JUDGED: u64 = 500;

/// A request counted in [`Activity`] until dropped; abandoned if dropped
/// before it became a response body ([`Tracked`]).
#[derive(Debug)]
pub struct OpenRequest {
    activity: Arc<Activity>,
    answered: bool,
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.activity.open_requests.fetch_sub(1, Ordering::Relaxed);
        if self.answered {
            self.activity
                .answered_requests
                .fetch_sub(1, Ordering::Relaxed);
        } else {
            self.activity.abandoned.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A response body that holds its request open (see [`Activity`]) until
/// hyper has written it and dropped it, or the client went away.
#[derive(Debug)]
pub struct Tracked<B> {
    body: B,
    _open: OpenRequest,
}

impl<B> Tracked<B> {
    #[must_use]
    pub fn new(body: B, mut open: OpenRequest) -> Tracked<B> {
        open.answered = true;
        open.activity
            .answered_requests
            .fetch_add(1, Ordering::Relaxed);
        Tracked { body, _open: open }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A client connection behind its [`FramingGuard`], reporting to its
/// [`Activity`]. Bytes handed back with [`ClientIo::rewind`] are read
/// again before the socket.
#[derive(Debug)]
pub struct ClientIo<T> {
    guard: FramingGuard<T>,
    /// Read from the socket (and seen by the guard) but not parsed yet.
    rewound: Bytes,
    activity: Arc<Activity>,
}

impl<T> ClientIo<T> {
    #[must_use]
    pub fn new(io: T) -> ClientIo<T> {
        ClientIo {
            guard: FramingGuard::new(io),
            rewound: Bytes::new(),
            activity: Arc::new(Activity::new()),
        }
    }

    /// The framing guard's flag, for the connection's request handler.
    #[must_use]
    pub fn framing(&self) -> AmbiguousFraming {
        self.guard.framing()
    }

    #[must_use]
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// The wrapped connection.
    #[must_use]
    pub fn get_ref(&self) -> &T {
        self.guard.get_ref()
    }

    /// Puts back bytes already read, to be read again before the socket.
    pub fn rewind(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.rewound = if self.rewound.is_empty() {
            bytes
        } else {
            [bytes, std::mem::take(&mut self.rewound)].concat().into()
        };
    }

    /// Whether rewound bytes are waiting to be read.
    #[must_use]
    pub fn has_rewound(&self) -> bool {
        !self.rewound.is_empty()
    }

    /// Tells the activity where the bytes read so far end, as the guard sees it.
    fn report_framing(&self) {
        let activity = &self.activity;
        activity
            .between_requests
            .store(self.guard.between_requests(), Ordering::Relaxed);
        activity
            .in_head
            .store(self.guard.in_head(), Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        // A load first: a swap on every read would cost a locked instruction.
        if this.activity.upgrade_declined.load(Ordering::Relaxed) {
            this.activity
                .upgrade_declined
                .store(false, Ordering::Relaxed);
            this.guard.upgrade_declined();
            this.report_framing();
        }
        if this.rewound.is_empty() {
            ready!(Pin::new(&mut this.guard).poll_read(cx, buf))?;
            this.report_framing();
        } else {
            let n = this.rewound.len().min(buf.remaining());
            buf.put_slice(&this.rewound[..n]);
            this.rewound.advance(n);
            if this.rewound.is_empty() {
                // An empty slice still holds its whole buffer.
                this.rewound = Bytes::new();
            }
        }
        if buf.filled().len() > before {
            count(&this.activity.reads);
        }
        Poll::Ready(Ok(()))
    }
}

/// Adds one to one of a connection's counts.
fn count(counter: &AtomicU64) {
    // A plain load and store: only the connection's task writes the counts.
    counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

impl Activity {
    /// Notes that a write found the socket full.
    fn write_blocked(&self) {
        self.blocked_at
            .store(self.writes().wrapping_add(1), Ordering::Relaxed);
    }

    /// Notes a flush or shutdown: one that waits is a blocked write, and
    /// one that completes after waiting moved the bytes it held (over TLS,
    /// the records rustls had buffered).
    fn flushed(&self, flushed: &Poll<io::Result<()>>) {
        match flushed {
            Poll::Pending => self.write_blocked(),
            Poll::Ready(_) if self.is_write_blocked() => count(&self.writes),
            Poll::Ready(_) => {}
        }
    }
}

/// Counts a write that moved bytes, and notes one that found the socket full.
fn counted(activity: &Activity, written: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
    match written {
        Poll::Ready(Ok(1..)) => count(&activity.writes),
        Poll::Pending => activity.write_blocked(),
        Poll::Ready(_) => {}
    }
    written
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ClientIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        counted(
            &this.activity,
            Pin::new(&mut this.guard).poll_write(cx, buf),
        )
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = coalesce::poll_write_vectored(Pin::new(&mut this.guard), cx, bufs);
        counted(&this.activity, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.guard.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.guard).poll_flush(cx);
        this.activity.flushed(&flushed);
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.activity.keep_open.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        // Over TLS, a shutdown sends the `close_notify` record.
        let shut = Pin::new(&mut this.guard).poll_shutdown(cx);
        this.activity.flushed(&shut);
        shut
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    /// A socket with no room at first: each write or flush waits once,
    /// then completes, as on a socket whose client reads again.
    #[derive(Default)]
    struct Full {
        waited: bool,
    }

    impl Full {
        fn once(&mut self) -> Poll<()> {
            self.waited = !self.waited;
            if self.waited {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        }
    }

    impl AsyncRead for Full {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Full {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().once().map(|()| Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().once().map(Ok)
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().once().map(Ok)
        }
    }

    fn context() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    #[test]
    fn a_write_that_waits_is_blocked_until_one_moves_bytes() {
        let mut io = ClientIo::new(Full::default());
        let activity = Arc::clone(io.activity());
        assert!(!activity.is_write_blocked());
        assert!(
            Pin::new(&mut io)
                .poll_write(&mut context(), b"data")
                .is_pending()
        );
        assert!(activity.is_write_blocked());
        assert!(
            Pin::new(&mut io)
                .poll_write(&mut context(), b"data")
                .is_ready()
        );
        assert!(!activity.is_write_blocked());
        assert_eq!(activity.writes(), 1);
    }

    /// Over TLS, the last bytes of a response may leave in a flush (or a
    /// shutdown's `close_notify`): one that completes after waiting is
    /// progress, or a quiet stream after it would look blocked.
    #[test]
    fn a_flush_or_shutdown_that_completes_after_waiting_clears_the_block() {
        let mut io = ClientIo::new(Full::default());
        let activity = Arc::clone(io.activity());
        assert!(Pin::new(&mut io).poll_flush(&mut context()).is_pending());
        assert!(activity.is_write_blocked());
        assert!(Pin::new(&mut io).poll_flush(&mut context()).is_ready());
        assert!(!activity.is_write_blocked());
        assert!(Pin::new(&mut io).poll_shutdown(&mut context()).is_pending());
        assert!(activity.is_write_blocked());
        assert!(Pin::new(&mut io).poll_shutdown(&mut context()).is_ready());
        assert!(!activity.is_write_blocked());
        // One that completes at once moved nothing the counts have not seen.
        let mut io = ClientIo::new(Full { waited: true });
        assert!(Pin::new(&mut io).poll_flush(&mut context()).is_ready());
        assert_eq!(io.activity().writes(), 0);
    }
}
