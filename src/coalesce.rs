//! Small vectored writes sent as one plain write.
//!
//! hyper hands each message to its socket as a vectored write: a response's
//! head and body as two slices, a request's head alone as one. Linux takes
//! more CPU for a `writev` than for a `send` of the same bytes, about a
//! quarter of a microsecond per request in the load comparison
//! (`BENCHMARKS.md`). So a vectored write of one slice goes out as a plain
//! write, and several slices that are small together are copied into one
//! buffer first. Larger ones stay vectored: there the copy would cost more
//! than the system call saves.
//!
//! Owns: that choice, for any `AsyncWrite`. Does not own: the sockets it is
//! used on (the client side's `proxy::idle::ClientIo`, and plain TCP
//! upstream connections in `upstream::connect`; a TLS upstream is left to
//! rustls, which builds its records itself).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

/// The most bytes copied to turn several slices into one write. Copying
/// 3 KB measured level with the `writev` it saves; a response head and a
/// small JSON body fit well under this.
pub const COALESCE_MAX: usize = 2048;

/// Writes `bufs` to `io` as `poll_write_vectored` would, with a plain write
/// when there is one slice, or several that add up to at most
/// [`COALESCE_MAX`] bytes. Returns how many bytes of `bufs` were written.
pub fn poll_write_vectored<W: AsyncWrite + ?Sized>(
    io: Pin<&mut W>,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    match bufs {
        [] => Poll::Ready(Ok(0)),
        [one] => io.poll_write(cx, one),
        several => {
            let total = several.iter().map(|buf| buf.len()).sum::<usize>();
            if total > COALESCE_MAX {
                return io.poll_write_vectored(cx, several);
            }
            let mut flat = Vec::with_capacity(total);
            for buf in several {
                flat.extend_from_slice(buf);
            }
            io.poll_write(cx, &flat)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    /// A writer that records each call: `Some(bytes)` for a plain write,
    /// `None` for a vectored one. It takes at most `limit` bytes per call.
    struct Recorder {
        calls: Vec<Option<Vec<u8>>>,
        limit: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.limit);
            self.calls.push(Some(buf[..n].to_vec()));
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.calls.push(None);
            let total = bufs.iter().map(|buf| buf.len()).sum::<usize>();
            Poll::Ready(Ok(total.min(self.limit)))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    async fn write(limit: usize, bufs: &[&[u8]]) -> (usize, Vec<Option<Vec<u8>>>) {
        let mut io = Recorder {
            calls: Vec::new(),
            limit,
        };
        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|buf| IoSlice::new(buf)).collect();
        let written = poll_fn(|cx| poll_write_vectored(Pin::new(&mut io), cx, &slices))
            .await
            .unwrap();
        (written, io.calls)
    }

    #[tokio::test]
    async fn one_slice_is_a_plain_write() {
        let (written, calls) = write(usize::MAX, &[b"head"]).await;
        assert_eq!((written, calls), (4, vec![Some(b"head".to_vec())]));
    }

    #[tokio::test]
    async fn small_slices_are_one_plain_write_in_order() {
        let (written, calls) = write(usize::MAX, &[b"head ", b"", b"body"]).await;
        assert_eq!((written, calls), (9, vec![Some(b"head body".to_vec())]));
    }

    #[tokio::test]
    async fn a_short_write_reports_what_went_out() {
        let (written, calls) = write(3, &[b"head ", b"body"]).await;
        assert_eq!((written, calls), (3, vec![Some(b"hea".to_vec())]));
    }

    #[tokio::test]
    async fn large_slices_stay_vectored() {
        let body = vec![b'x'; COALESCE_MAX];
        let (written, calls) = write(usize::MAX, &[b"head", &body]).await;
        assert_eq!((written, calls), (COALESCE_MAX + 4, vec![None]));
    }

    #[tokio::test]
    async fn no_slices_write_nothing() {
        let (written, calls) = write(usize::MAX, &[]).await;
        assert_eq!((written, calls), (0, Vec::new()));
    }
}
