//! The HTTP accept loop. `axum::serve` has no timeouts and no connection cap, so this
//! serves each connection with hyper directly and watches it:
//!
//! - a connection waiting for its next request is closed after the idle timeout;
//! - a request head must arrive whole within the header timeout (slow-loris);
//! - a request in flight (a long poll, a download, a slow body) is never idle: its body has
//!   its own deadline (`BodyDeadline`, enforced where bodies are read);
//! - heads too large for the limits below are answered 414 or 431 with a JSON body by this
//!   module, before hyper sees them (hyper's own answers have empty bodies);
//! - beyond the connection cap, a new connection is answered 503 JSON and closed;
//! - after a request that moved many bytes, the allocator returns free memory to the OS.
//!
//! On shutdown, idle connections close at once and requests in flight finish.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use axum::Router;
use http_body_util::BodyExt as _;
use hyper::body::Body as _;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::limits::Limits;

/// A request line (method, target, version) longer than this is answered 414.
pub const MAX_REQUEST_LINE_BYTES: usize = 8 * 1024;
/// A request head (request line and headers) longer than this is answered 431.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;
/// More header lines than this are answered 431 (hyper's own limit is 100).
pub const MAX_HEADERS: usize = 96;
/// After a request that read or wrote more than this, free memory is returned to the OS.
const COLLECT_AFTER_BYTES: u64 = 1024 * 1024;
/// Connections refused over the cap that may linger (to let the client read the 503).
const MAX_LINGERING_REFUSALS: usize = 64;

/// When the body of a request must have arrived; set on every request by this server.
#[derive(Clone, Copy, Debug)]
pub struct BodyDeadline(pub Instant);

/// Serves `router` on `listener` until `shutdown` becomes true, then waits for the open
/// connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = Arc::new(limits);
    let open = Arc::new(AtomicUsize::new(0));
    let lingering = Arc::new(AtomicUsize::new(0));
    // Every connection task holds a sender; `recv` answers `None` once all are gone.
    let (connections_alive, mut all_closed) = mpsc::channel::<()>(1);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= limits.max_connections {
            refuse_over_capacity(stream, &lingering);
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let slot = ConnectionSlot {
            open: open.clone(),
            _alive: connections_alive.clone(),
        };
        tokio::spawn(serve_connection(
            stream,
            peer,
            router.clone(),
            limits.clone(),
            shutdown.clone(),
            slot,
        ));
    }
    drop(listener);
    drop(connections_alive);
    let _ = all_closed.recv().await;
}

/// Counts an open connection until dropped.
struct ConnectionSlot {
    open: Arc<AtomicUsize>,
    _alive: mpsc::Sender<()>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A complete HTTP/1.1 answer with a JSON `{"detail": ...}` body that closes the connection.
fn json_answer(status: u16, reason: &str, detail: &str, extra_headers: &str) -> Vec<u8> {
    let body = serde_json::json!({ "detail": detail }).to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answers 503 without reading the request, then closes. The socket's send buffer is
/// empty, so the short answer is written without waiting.
fn refuse_over_capacity(stream: TcpStream, lingering: &Arc<AtomicUsize>) {
    let answer = json_answer(
        503,
        "Service Unavailable",
        "too many open connections (MORAG_JOBS_HTTP_MAX_CONNECTIONS), try again",
        "retry-after: 1\r\n",
    );
    let _ = stream.try_write(&answer);
    // Closing with unread request bytes would reset the connection and could destroy the
    // answer before the client reads it: read and drop them for a moment first, for a
    // bounded number of refused connections at a time.
    if lingering.fetch_add(1, Ordering::Relaxed) >= MAX_LINGERING_REFUSALS {
        lingering.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let lingering = lingering.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = stream;
        let _ = stream.shutdown().await;
        let mut scratch = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while matches!(stream.read(&mut scratch).await, Ok(n) if n > 0) {}
        })
        .await;
        lingering.fetch_sub(1, Ordering::Relaxed);
    });
}

async fn serve_connection(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    router: Router,
    limits: Arc<Limits>,
    mut shutdown: watch::Receiver<bool>,
    _slot: ConnectionSlot,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(WatchedStream {
        inner: stream,
        activity: activity.clone(),
        refusal: None,
        shut_down_while_unscanned: false,
    });
    let service_activity = activity.clone();
    let body_timeout = limits.body_timeout;
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let body_finished = Arc::new(AtomicBool::new(request.body().is_end_stream()));
        let request_guard = RequestGuard::begin(service_activity.clone(), body_finished.clone());
        let mut request = request.map(|inner| {
            Body::new(WatchedBody {
                inner,
                finished: body_finished,
            })
        });
        request
            .extensions_mut()
            .insert(BodyDeadline(Instant::now() + body_timeout));
        // The worker registry records where workers call from.
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let mut router = router.clone();
        async move {
            let response = match tower_service::Service::call(&mut router, request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            // The request counts as in flight until its answer's body is sent (or dropped).
            Ok::<_, Infallible>(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _ = &request_guard;
                    frame
                }))
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        // The watchdog below times heads; hyper's timer would also close idle connections
        // at the head timeout.
        .header_read_timeout(None)
        .max_buf_size((MAX_HEAD_BYTES * 2).max(8192));
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        let now = Instant::now();
        let check_at = match activity.deadline(&limits, draining) {
            Some(deadline) => deadline,
            None => now + limits.idle_timeout.min(limits.header_timeout),
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(check_at) => {
                if activity.deadline(&limits, draining).is_some_and(|d| d <= Instant::now()) {
                    // Dropping the connection closes the socket.
                    return;
                }
            }
            _ = shutdown.wait_for(|stop| *stop), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// What a connection is doing, for the watchdog and the head limits.
struct Activity {
    state: Mutex<ActivityState>,
}

struct ActivityState {
    phase: Phase,
    /// Requests handed to the router and not yet answered in full.
    in_flight: usize,
    /// Bytes read and written on the connection so far.
    bytes_moved: u64,
}

enum Phase {
    /// Waiting for the next request since `since`.
    Idle { since: Instant },
    /// Reading a request head that began at `since`.
    Head { since: Instant, scan: HeadScan },
    /// A head was read at `since`; its request is being served.
    Request { since: Instant },
    /// The head broke a limit and was answered at `since`; the connection is closing.
    Refused { since: Instant },
    /// A request was answered at `since` before its body was read to the end: what
    /// arrives now may be the rest of that body, so it is not scanned as a head.
    Unscanned { since: Instant },
}

#[derive(Default)]
struct HeadScan {
    bytes: usize,
    lines: usize,
    request_line_done: bool,
    after_newline: bool,
}

/// What to do with bytes just read.
enum ReadVerdict {
    Pass,
    Refuse(Vec<u8>),
}

impl Activity {
    fn new() -> Activity {
        Activity {
            state: Mutex::new(ActivityState {
                phase: Phase::Idle {
                    since: Instant::now(),
                },
                in_flight: 0,
                bytes_moved: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// When the connection must be closed unless something happens, if ever.
    fn deadline(&self, limits: &Limits, draining: bool) -> Option<Instant> {
        let state = self.lock();
        let waiting = |since: Instant, timeout: Duration| {
            // Shutting down: a connection with no request in flight goes now.
            Some(if draining {
                since.min(Instant::now())
            } else {
                since + timeout
            })
        };
        match state.phase {
            _ if state.in_flight > 0 => None,
            Phase::Idle { since } => waiting(since, limits.idle_timeout),
            Phase::Head { since, .. }
            | Phase::Request { since }
            | Phase::Refused { since }
            | Phase::Unscanned { since } => waiting(since, limits.header_timeout),
        }
    }

    fn on_write(&self, n: usize) {
        self.lock().bytes_moved += n as u64;
    }

    fn on_read(&self, data: &[u8]) -> ReadVerdict {
        let mut state = self.lock();
        state.bytes_moved += data.len() as u64;
        let now = Instant::now();
        if let Phase::Idle { .. } = state.phase {
            if state.in_flight == 0 {
                state.phase = Phase::Head {
                    since: now,
                    scan: HeadScan::default(),
                };
            }
        }
        let Phase::Head { scan, .. } = &mut state.phase else {
            return ReadVerdict::Pass;
        };
        for &byte in data {
            scan.bytes += 1;
            if byte == b'\n' {
                if scan.after_newline {
                    state.phase = Phase::Request { since: now };
                    return ReadVerdict::Pass;
                }
                scan.after_newline = true;
                scan.request_line_done = true;
                scan.lines += 1;
            } else if byte != b'\r' {
                scan.after_newline = false;
            }
            let refusal = if !scan.request_line_done && scan.bytes > MAX_REQUEST_LINE_BYTES {
                Some(json_answer(
                    414,
                    "URI Too Long",
                    &format!("request line longer than {MAX_REQUEST_LINE_BYTES} bytes"),
                    "",
                ))
            } else if scan.bytes > MAX_HEAD_BYTES || scan.lines > MAX_HEADERS + 1 {
                Some(json_answer(
                    431,
                    "Request Header Fields Too Large",
                    &format!(
                        "request head larger than {MAX_HEAD_BYTES} bytes or more than {MAX_HEADERS} headers"
                    ),
                    "",
                ))
            } else {
                None
            };
            if let Some(answer) = refusal {
                state.phase = Phase::Refused { since: now };
                return ReadVerdict::Refuse(answer);
            }
        }
        ReadVerdict::Pass
    }
}

/// Marks a request in flight from the router's call until its answer is sent.
struct RequestGuard {
    activity: Arc<Activity>,
    bytes_at_start: u64,
    /// Set once the request's body was read to its end.
    body_finished: Arc<AtomicBool>,
}

impl RequestGuard {
    fn begin(activity: Arc<Activity>, body_finished: Arc<AtomicBool>) -> RequestGuard {
        let bytes_at_start = {
            let mut state = activity.lock();
            state.in_flight += 1;
            state.phase = Phase::Request {
                since: Instant::now(),
            };
            state.bytes_moved
        };
        RequestGuard {
            activity,
            bytes_at_start,
            body_finished,
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let moved = {
            let mut state = self.activity.lock();
            state.in_flight = state.in_flight.saturating_sub(1);
            if state.in_flight == 0 {
                let since = Instant::now();
                state.phase = if self.body_finished.load(Ordering::Relaxed) {
                    Phase::Idle { since }
                } else {
                    Phase::Unscanned { since }
                };
            }
            state.bytes_moved - self.bytes_at_start
        };
        if moved > COLLECT_AFTER_BYTES {
            return_free_memory();
        }
    }
}

/// Asks mimalloc (the binary's allocator) to give freed pages back to the OS; after a
/// large body they would otherwise stay in the process. Runs off the async workers.
fn return_free_memory() {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn_blocking(|| {
            // SAFETY: mi_collect has no preconditions; it only frees unused memory.
            unsafe { libmimalloc_sys::mi_collect(true) }
        });
    }
}

/// A request body that records when it was read to its end.
struct WatchedBody {
    inner: hyper::body::Incoming,
    finished: Arc<AtomicBool>,
}

impl hyper::body::Body for WatchedBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.finished.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The TCP stream as hyper sees it: reads feed the activity (and the head limits), and a
/// head that breaks a limit is answered here and never reaches hyper.
struct WatchedStream {
    inner: TcpStream,
    activity: Arc<Activity>,
    refusal: Option<Refusal>,
    /// Our side was shut down while the rest of a refused body may still arrive.
    shut_down_while_unscanned: bool,
}

struct Refusal {
    answer: Vec<u8>,
    written: usize,
    shut_down: bool,
}

impl WatchedStream {
    /// Sends the refusal, closes our side, and drops what the client still sends until
    /// it closes (closing with unread bytes would reset the connection and could destroy
    /// the answer before the client reads it). Then tells hyper the stream ended.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let refusal = self.refusal.as_mut().expect("a refusal is pending");
        while refusal.written < refusal.answer.len() {
            let n = ready!(
                Pin::new(&mut self.inner).poll_write(cx, &refusal.answer[refusal.written..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            refusal.written += n;
        }
        if !refusal.shut_down {
            ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
            refusal.shut_down = true;
        }
        let mut scratch = [0u8; 4096];
        for _ in 0..16 {
            let mut discard = ReadBuf::new(&mut scratch);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut discard))?;
            if discard.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
        }
        // Let other tasks run; the watchdog closes the connection at the head timeout.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.refusal.is_some() {
                return this.poll_refusal(cx);
            }
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let read = &buf.filled()[before..];
            if read.is_empty() {
                return Poll::Ready(Ok(()));
            }
            match this.activity.on_read(read) {
                ReadVerdict::Pass => return Poll::Ready(Ok(())),
                ReadVerdict::Refuse(answer) => {
                    buf.set_filled(before);
                    this.refusal = Some(Refusal {
                        answer,
                        written: 0,
                        shut_down: false,
                    });
                }
            }
        }
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.activity.on_write(n);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        this.activity.on_write(n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !matches!(this.activity.lock().phase, Phase::Unscanned { .. }) {
            return Pin::new(&mut this.inner).poll_shutdown(cx);
        }
        // A request was answered before its body was read to the end (an early 413): the
        // client may still be sending it. Closing with those bytes unread would reset the
        // connection and could destroy the answer before the client reads it, so close our
        // side and drop what arrives until the client closes (the watchdog ends this at the
        // header timeout).
        if !this.shut_down_while_unscanned {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.shut_down_while_unscanned = true;
        }
        let mut scratch = [0u8; 4096];
        for _ in 0..16 {
            let mut discard = ReadBuf::new(&mut scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut discard))?;
            if discard.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
