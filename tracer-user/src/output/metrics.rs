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
use axum::{
    extract::{Request, State},
    http::{header, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
    time::{Instant, Sleep},
};

use super::web_config::WebConfig;
use crate::render::prometheus::{self, SharedReport, CONTENT_TYPE};

/// Binds `addr` (`HOST:PORT`, the first of HOST's addresses that binds).
/// Fails with `cannot listen on ADDR: REASON`. Called before anything is
/// attached or started, so a busy port starts nothing.
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow!("cannot listen on {addr}: {e}"))
}

/// A bound `/metrics` socket and how it is protected (`--web-config`).
pub struct Endpoint {
    pub listener: TcpListener,
    pub web: Option<Arc<WebConfig>>,
}

impl Endpoint {
    /// `https` with TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.web.as_ref().is_some_and(|w| w.tls.is_some()) { "https" } else { "http" }
    }
}

impl From<TcpListener> for Endpoint {
    fn from(listener: TcpListener) -> Self {
        Endpoint { listener, web: None }
    }
}

/// Reads the web configuration (when given), then binds `addr`: both fail
/// with one line before anything is attached or started.
pub async fn endpoint(addr: &str, web_config: Option<&std::path::Path>) -> anyhow::Result<Endpoint> {
    let web = web_config.map(WebConfig::load).transpose()?.map(Arc::new);
    Ok(Endpoint { listener: bind(addr).await?, web })
}

/// Serves `/metrics` from `shared` on `endpoint` on a spawned task until
/// `shutdown` completes. Returns the bound address (useful with port 0) and
/// the server task, which ends with the server's I/O result. Must be called
/// within a tokio runtime.
pub async fn serve(
    endpoint: Endpoint,
    shared: SharedReport,
    max_sites: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    serve_registry(endpoint, prometheus::registry(shared, max_sites), shutdown).await
}

/// Serves `registry` (encoded at each scrape) on `endpoint` like [`serve`]:
/// `leaktrace agent` registers the whole fleet's collector.
pub async fn serve_registry(
    endpoint: Endpoint,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    let Endpoint { listener, web } = endpoint;
    let local_addr = listener.local_addr()?;
    let registry = Arc::new(registry);
    let mut app = Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(index))
        .with_state(registry);
    if let Some(web) = web.clone().filter(|w| w.requires_auth()) {
        app = app.layer(axum::middleware::from_fn(move |req: Request, next: Next| {
            let web = web.clone();
            async move { authenticate(web, req, next).await }
        }));
    }
    let (done_tx, done_rx) = tokio::sync::mpsc::channel(16);
    let listener = Bounded {
        inner: listener,
        slots: Arc::new(Semaphore::new(connection_slots())),
        tls: web.and_then(|w| w.tls.clone()).map(tokio_rustls::TlsAcceptor::from),
        handshaken: (done_tx, done_rx),
    };
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    });
    Ok((local_addr, task))
}

/// `basic_auth_users`: 401 with a `WWW-Authenticate` challenge unless the
/// request carries a user and password that match.
async fn authenticate(web: Arc<WebConfig>, req: Request, next: Next) -> Response {
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if web.authorized(header).await {
        return next.run(req).await;
    }
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Basic realm=\"leaktrace\"")], "Unauthorized\n").into_response()
}

/// A TLS handshake that takes longer is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The metrics listener with a bound on connections and their idle time;
/// with TLS, handshakes run on their own tasks (a slow client does not hold
/// the others up) and finished ones come back on `handshaken`.
struct Bounded {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handshaken: (
        tokio::sync::mpsc::Sender<(Conn, SocketAddr)>,
        tokio::sync::mpsc::Receiver<(Conn, SocketAddr)>,
    ),
}

/// A served connection, plain or TLS.
enum Conn {
    Plain(BoundedStream),
    Tls(Box<tokio_rustls::server::TlsStream<BoundedStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl axum::serve::Listener for Bounded {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let accepted = tokio::select! {
                done = self.handshaken.1.recv() => match done {
                    Some(conn) => return conn,
                    None => continue,
                },
                accepted = self.inner.accept() => accepted,
            };
            let (stream, addr) = match accepted {
                Ok(x) => x,
                // Out of descriptors (or another transient failure): wait
                // for connections to end rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let now = Instant::now();
            let stream = BoundedStream {
                stream,
                _slot: slot,
                idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
                end_of_life: now + MAX_CONNECTION_AGE,
            };
            match &self.tls {
                None => return (Conn::Plain(stream), addr),
                Some(acceptor) => {
                    let (acceptor, done) = (acceptor.clone(), self.handshaken.0.clone());
                    tokio::spawn(async move {
                        if let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                            let _ = done.send((Conn::Tls(Box::new(tls)), addr)).await;
                        }
                    });
                }
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
            bind("localhost:0").await.unwrap().into(),
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
