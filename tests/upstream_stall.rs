//! An upstream that stops reading a request, with the real proxy.
//!
//! Owns: the proxy letting go of an upstream connection whose exchange it
//! gave up on. In a file of its own: it reads a process-wide gauge of
//! upstream connections, which other tests' upstreams would move.

mod support;

use support::{cohort, eventually_async, metric, read_head, within};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that reads a request's head and then neither reads its body
/// nor answers: the 504 at the response timeout also lets go of the
/// upstream connection (and with it the client's body), as nginx's
/// `proxy_send_timeout` does, even with its client gone and part of the
/// body still unread in the proxy's socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_reads_no_body_is_let_go_at_the_response_timeout() {
    const BODY: usize = 16 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("an address");
    let (uploads, mut upload) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let uploads = uploads.clone();
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                if head.starts_with("POST") {
                    let _ = uploads.send(stream);
                } else {
                    // A health probe.
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                }
            });
        }
    });
    let server = cohort(&[addr], None, "[upstream]\nresponse_timeout = \"500ms\"\n").await;

    let client = TcpStream::connect(server.proxy_addr())
        .await
        .expect("connect");
    let (mut from_proxy, mut to_proxy) = client.into_split();
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: a\r\nx-user-id: alice\r\ncontent-length: {BODY}\r\n\r\n"
    );
    // Writes as much of the body as the sockets take, then holds on.
    let writer = tokio::spawn(async move {
        let _ = to_proxy.write_all(head.as_bytes()).await;
        let _ = to_proxy.write_all(&vec![b'x'; BODY]).await;
        std::future::pending::<()>().await;
    });
    let mut answer = vec![0u8; 12];
    within("the 504", from_proxy.read_exact(&mut answer))
        .await
        .expect("an answer");
    assert_eq!(
        &answer,
        b"HTTP/1.1 504",
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // The client leaves, as curl does once answered.
    writer.abort();
    drop(from_proxy);

    // The upstream holds its end open and reads nothing more.
    let _held = within("the upload at the upstream", upload.recv())
        .await
        .expect("the upload reached the upstream");
    eventually_async("the proxy to let go of the upstream connection", || async {
        metric(&server, "cohort_upstream_connections", &[]).await == Some(0.0)
    })
    .await;
}
