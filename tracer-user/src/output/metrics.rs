//! The `/metrics` HTTP endpoint: serves the latest report as OpenMetrics text
//! so Prometheus can scrape a running trace.
//!
//! Before the first report exists, `/metrics` answers 200 with only
//! `leaktrace_up 0` (a scrape that fails would look like leaktrace being
//! down, which it is not). `GET /` answers one line pointing at `/metrics`.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::anyhow;
use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};
use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
    time::{Instant, Sleep},
};

use crate::render::prometheus::{self, SharedReport, CONTENT_TYPE};

/// Binds `addr` (`HOST:PORT`, the first of HOST's addresses that binds).
/// Fails with `cannot listen on ADDR: REASON`. Called before anything is
/// attached or started, so a busy port starts nothing.
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow!("cannot listen on {addr}: {e}"))
}

/// Serves `/metrics` from `shared` on `listener` on a spawned task until
/// `shutdown` completes. Returns the bound address (useful with port 0) and
/// the server task, which ends with the server's I/O result. Must be called
/// within a tokio runtime.
pub async fn serve(
    listener: TcpListener,
    shared: SharedReport,
    max_sites: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    serve_registry(listener, prometheus::registry(shared, max_sites), shutdown).await
}

/// Serves `registry` (encoded at each scrape) on `listener` like [`serve`]:
/// `leaktrace agent` registers the whole fleet's collector.
pub async fn serve_registry(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    let local_addr = listener.local_addr()?;
    let registry = Arc::new(registry);
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(index))
        .with_state(registry);
    let listener = Bounded { inner: listener, slots: Arc::new(Semaphore::new(connection_slots())) };
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    });
    Ok((local_addr, task))
}

/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection lives longer (a scraper reconnects; a client trickling
/// bytes cannot hold a slot for ever).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// Connections served at once: a quarter of leaktrace's descriptor limit,
/// 16 to 512. Beyond it new connections are closed at once, so clients on
/// /metrics can never take the descriptors tracing needs.
pub fn connection_slots() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 1024, rlim_max: 1024 };
    // SAFETY: fills `lim`.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (lim.rlim_cur / 4).clamp(16, 512) as usize
}

/// The metrics listener with a bound on connections and their idle time.
struct Bounded {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

impl axum::serve::Listener for Bounded {
    type Io = BoundedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(x) => x,
                // Out of descriptors (or another transient failure): wait
                // for connections to end rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    let now = Instant::now();
                    return (
                        BoundedStream {
                            stream,
                            _slot: slot,
                            idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
                            end_of_life: now + MAX_CONNECTION_AGE,
                        },
                        addr,
                    );
                }
                Err(_) => drop(stream),
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A served connection: holds its slot, and fails its reads once it was
/// idle for [`IDLE_TIMEOUT`] or lived [`MAX_CONNECTION_AGE`] (the server
/// then closes it).
struct BoundedStream {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    idle: Pin<Box<Sleep>>,
    end_of_life: Instant,
}

impl AsyncRead for BoundedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                let deadline = (Instant::now() + IDLE_TIMEOUT).min(self.end_of_life);
                self.idle.as_mut().reset(deadline);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for BoundedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

async fn metrics(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        prometheus::encode_registry_text(&registry),
    )
}

async fn index() -> &'static str {
    "leaktrace: Prometheus metrics at /metrics\n"
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
        sync::oneshot,
    };

    use super::*;
    use crate::render::{json::tests::example_report, prometheus::new_shared_report};

    /// A raw HTTP/1.1 GET; returns the whole response (head and body).
    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn serves_the_latest_report_and_shuts_down() {
        let shared = new_shared_report();
        let (stop, stopped) = oneshot::channel::<()>();
        let (addr, task) = serve(
            bind("localhost:0").await.unwrap(),
            shared.clone(),
            prometheus::DEFAULT_MAX_SITES,
            async move {
                let _ = stopped.await;
            },
        )
        .await
        .unwrap();
        assert_ne!(addr.port(), 0);

        let before = get(addr, "/metrics").await;
        assert!(before.starts_with("HTTP/1.1 200 OK\r\n"), "{before}");
        assert!(before.contains("leaktrace_up 0\n"));
        assert!(!before.contains("leaktrace_live_objects"));

        *shared.write().unwrap() = Some(example_report());
        let after = get(addr, "/metrics").await;
        assert!(after.starts_with("HTTP/1.1 200 OK\r\n"), "{after}");
        assert!(after
            .to_ascii_lowercase()
            .contains(&format!("content-type: {CONTENT_TYPE}\r\n")));
        assert!(
            after.contains("# TYPE leaktrace_live_objects gauge\n"),
            "{after}"
        );
        assert!(after.contains(r#"site="main.badHandler""#));
        assert!(after.ends_with("# EOF\n"));

        let index = get(addr, "/").await;
        assert!(index.contains("/metrics"), "{index}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));

        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn bind_error_is_one_clear_line() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(&addr.to_string()).await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("cannot listen on {addr}: ")),
            "{err}"
        );
        assert!(!err.contains('\n'));
    }
}
