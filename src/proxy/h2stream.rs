//! The tasks of the HTTP/2 streams a client connection serves, and the send
//! timeout each keeps.
//!
//! hyper runs each HTTP/2 stream on a task of its own, spawned through the
//! executor its connection builder was given, and asks a response body for
//! its next frame only once the client's flow-control window has room for
//! it. A client that stops reading one stream, while its connection carries
//! on, would hold that response (and the upstream connection it comes from)
//! for as long as it likes: the connection's socket is never blocked, so the
//! listener's send timeout cannot see it. nginx applies `send_timeout` to
//! such a stream; so does this.
//!
//! Owns: [`StreamExecutor`], which spawns each stream's task with a
//! [`StreamProgress`] in scope and resets the stream (drops its task, and h2
//! sends `RST_STREAM`) once its body has waited `listen.send_timeout` to be
//! asked for its next frame; and the progress a response body reports.
//! Does not own: the connection-wide timeouts (`listener`), nor counting a
//! request open (`idle::Tracked`, which reports here).

use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

tokio::task_local! {
    /// The progress of the stream whose task is running.
    static STREAM: Arc<StreamProgress>;
}

/// How far a stream's response body has got, as its body reports it.
#[derive(Debug, Default)]
pub struct StreamProgress {
    /// The body handed over a frame and has not been asked for the next
    /// one since: the stream waits on its client's window.
    waiting: AtomicBool,
    /// Frames handed over, so that a new wait is told from an old one.
    frames: AtomicU64,
}

impl StreamProgress {
    /// The progress of the HTTP/2 stream running on this task, if any.
    #[must_use]
    pub fn current() -> Option<Arc<StreamProgress>> {
        STREAM.try_with(Arc::clone).ok()
    }

    /// Notes that hyper asks the body for its next frame.
    pub fn asked(&self) {
        self.waiting.store(false, Ordering::Relaxed);
    }

    /// Notes that the body handed hyper a frame.
    pub fn handed(&self) {
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
        let timeout = self.send_timeout;
        tokio::spawn(async move {
            let progress = Arc::new(StreamProgress::default());
            let stream = STREAM.scope(Arc::clone(&progress), stream);
            tokio::pin!(stream);
            // Armed only while the body waits: most streams never do.
            let timer = tokio::time::sleep(timeout);
            tokio::pin!(timer);
            // The wait the timer is armed for: its frame count.
            let mut timed: Option<u64> = None;
            let cut = poll_fn(|cx| {
                if stream.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                // The body reports only while its task runs, and this check
                // follows each run: a wait that starts is seen here.
                let Some(wait) = progress.wait() else {
                    return Poll::Pending;
                };
                if timed != Some(wait) {
                    timed = Some(wait);
                    timer.as_mut().reset(Instant::now() + timeout);
                }
                timer.as_mut().poll(cx).map(|()| true)
            })
            .await;
            if cut {
                tracing::debug!(
                    ?timeout,
                    "HTTP/2 stream reset: the client took nothing of its response within the send timeout"
                );
            }
        });
    }
}
