//! The tasks of the HTTP/2 streams a client connection serves, and the send
//! timeout each keeps.
//!
//! hyper runs each HTTP/2 stream on a task of its own, spawned through the
//! executor its connection builder was given. It takes a frame of the
//! response body, waits until the client's flow-control window has room for
//! it, hands it to h2, and only then asks the body for the next one. A
//! client that stops reading one stream, while its connection carries on,
//! would hold that response (and the upstream connection it comes from) for
//! as long as it likes: the connection's socket is never blocked, so the
//! listener's send timeout cannot see it. nginx applies `send_timeout` to
//! such a stream, restarting it whenever the client's window lets more
//! through; so does this.
//!
//! Owns: [`StreamExecutor`], which spawns each stream's task with a
//! [`StreamProgress`] in scope and resets the stream (drops its task, and h2
//! sends `RST_STREAM` once the request body, if still on its way upstream,
//! is dropped too) once its body has waited `listen.send_timeout` to be
//! asked for its next frame; and [`ReportingBody`], the response body's
//! side: it hands hyper the body's data in pieces of at most 64 KiB and
//! reports each. Does not own: the connection-wide timeouts (`listener`), nor
//! counting a request open (`idle::Tracked`, which it wraps).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::{Instant, Sleep};

/// The largest piece of a response body handed to hyper at once. hyper asks
/// for the next frame only once h2 has sent what it holds, so with an
/// upstream's read of up to 400 KiB handed whole, a client reading steadily
/// but slowly would see no progress for as long as that read takes to
/// drain. A client must take one piece per send timeout (about 1 KiB/s
/// at the default 60 s); smaller pieces would cost more of h2's per-send
/// work on every large response (16 KiB cost four times as much).
const PIECE_LEN: usize = 64 * 1024;

tokio::task_local! {
    /// The progress of the stream whose task is running.
    static STREAM: Arc<StreamProgress>;
}

/// How far a stream's response body has got, as its [`ReportingBody`] tells.
#[derive(Debug, Default)]
pub struct StreamProgress {
    /// The body handed over a frame and has not been asked for the next
    /// one since: the stream waits on its client's window.
    waiting: AtomicBool,
    /// Frames handed over, so that a new wait is told from an old one.
    frames: AtomicU64,
}

impl StreamProgress {
    fn asked(&self) {
        self.waiting.store(false, Ordering::Relaxed);
    }

    fn handed(&self) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.waiting.store(true, Ordering::Relaxed);
    }

    /// The frame count of the wait under way, if the body is waiting to be
    /// asked for its next frame.
    fn wait(&self) -> Option<u64> {
        self.waiting
            .load(Ordering::Relaxed)
            .then(|| self.frames.load(Ordering::Relaxed))
    }
}

/// A response body on an HTTP/2 stream, reporting to the stream's task
/// each time hyper asks for a frame and each frame handed over. Data is
/// handed in pieces of at most 64 KiB, so that each ask follows at most
/// that much of the client's window.
#[derive(Debug)]
pub struct ReportingBody<B> {
    body: B,
    progress: Arc<StreamProgress>,
    /// What is left of the body's last data frame.
    rest: Bytes,
}

impl<B> ReportingBody<B> {
    /// `body`, reporting to the HTTP/2 stream running on this task (to no
    /// one, off such a task).
    #[must_use]
    pub fn new(body: B) -> ReportingBody<B> {
        ReportingBody {
            body,
            progress: STREAM.try_with(Arc::clone).unwrap_or_default(),
            rest: Bytes::new(),
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for ReportingBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        this.progress.asked();
        if this.rest.is_empty() {
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.rest = data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                end_or_error => return Poll::Ready(end_or_error),
            }
        }
        let piece = this.rest.split_to(this.rest.len().min(PIECE_LEN));
        this.progress.handed();
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let hint = self.body.size_hint();
        if self.rest.is_empty() {
            return hint;
        }
        let held = self.rest.remaining() as u64;
        let mut sum = SizeHint::new();
        sum.set_lower(hint.lower().saturating_add(held));
        if let Some(upper) = hint.upper() {
            sum.set_upper(upper.saturating_add(held));
        }
        sum
    }
}

/// Spawns hyper's HTTP/2 stream tasks on the current tokio runtime, each
/// reset once its response has waited `send_timeout` for the client.
#[derive(Debug, Clone, Copy)]
pub struct StreamExecutor {
    send_timeout: Duration,
}

impl StreamExecutor {
    #[must_use]
    pub fn new(send_timeout: Duration) -> StreamExecutor {
        StreamExecutor { send_timeout }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        let progress = Arc::new(StreamProgress::default());
        tokio::spawn(StreamTask {
            stream: STREAM.scope(Arc::clone(&progress), stream),
            progress,
            timeout: self.send_timeout,
            timer: None,
        });
    }
}

pin_project! {
    /// One HTTP/2 stream's task: hyper's stream future with its progress in
    /// scope, and the timer of the wait under way. A struct rather than an
    /// `async` block, which would hold the stream future twice (as captured
    /// and as scoped), and hyper's is several KiB, moved on every spawn.
    struct StreamTask<F> {
        #[pin]
        stream: TaskLocalFuture<Arc<StreamProgress>, F>,
        progress: Arc<StreamProgress>,
        timeout: Duration,
        // The wait under way (its frame count) and when it runs out: made
        // only once the body waits, which most streams never do.
        timer: Option<(u64, Pin<Box<Sleep>>)>,
    }
}

impl<F: Future<Output = ()>> Future for StreamTask<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.stream.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        // The body reports only while its task runs, and this check follows
        // each run: a wait that starts is seen here.
        let Some(wait) = this.progress.wait() else {
            return Poll::Pending;
        };
        let timeout = *this.timeout;
        let (timed, sleep) = this.timer.get_or_insert_with(|| {
            (
                wait,
                Box::pin(tokio::time::sleep_until(Instant::now() + timeout)),
            )
        });
        if *timed != wait {
            *timed = wait;
            sleep.as_mut().reset(Instant::now() + timeout);
        }
        ready!(sleep.as_mut().poll(cx));
        tracing::debug!(
            ?timeout,
            "HTTP/2 stream reset: the client took nothing of its response within the send timeout"
        );
        // Dropping the task drops hyper's stream, and h2 resets it.
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt as _, Empty, Full};

    use super::*;

    #[tokio::test]
    async fn a_large_frame_is_handed_on_in_pieces_each_reported() {
        let progress = Arc::new(StreamProgress::default());
        let (pieces, end) = STREAM
            .scope(Arc::clone(&progress), async {
                let data = Bytes::from(vec![b'x'; 2 * PIECE_LEN + 10]);
                let mut body = ReportingBody::new(Full::new(data));
                let mut pieces = Vec::new();
                while let Some(frame) = body.frame().await {
                    let data = frame.expect("a good frame").into_data().expect("data");
                    pieces.push((data.len(), body.size_hint().exact()));
                    // Handed, and not asked again yet: the stream waits.
                    assert!(progress.wait().is_some());
                }
                (pieces, body.is_end_stream())
            })
            .await;
        assert_eq!(
            pieces,
            [
                (PIECE_LEN, Some(PIECE_LEN as u64 + 10)),
                (PIECE_LEN, Some(10)),
                (10, Some(0))
            ]
        );
        assert!(end);
        assert_eq!(progress.frames.load(Ordering::Relaxed), 3);
        // Asked once more, for the end: no longer waiting.
        assert_eq!(progress.wait(), None);
    }

    #[tokio::test]
    async fn the_end_is_not_announced_before_the_last_piece() {
        let data = Bytes::from(vec![b'x'; PIECE_LEN + 1]);
        let mut body = ReportingBody::new(Full::new(data));
        assert!(!body.is_end_stream());
        body.frame()
            .await
            .expect("a first piece")
            .expect("a good frame");
        assert!(!body.is_end_stream(), "a piece is still held");
        body.frame()
            .await
            .expect("the last piece")
            .expect("a good frame");
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn an_empty_body_reports_nothing_handed() {
        let progress = Arc::new(StreamProgress::default());
        STREAM
            .scope(Arc::clone(&progress), async {
                let mut body = ReportingBody::new(Empty::<Bytes>::new());
                assert!(body.frame().await.is_none());
            })
            .await;
        assert_eq!(progress.frames.load(Ordering::Relaxed), 0);
    }
}
