//! What a peer may hold on the HTTP side before (or instead of) a
//! WebSocket, and for how long. Rules:
//!
//! - **Open HTTP connections** are capped in total
//!   (`--max-http-connections`) and per client address
//!   (`--max-http-connections-per-ip`; behind a proxy every request comes
//!   from the proxy's address, so raise it or set 0 there). A connection
//!   holds its [`HttpPermit`] while it speaks HTTP, including keep-alive
//!   idle time, and gives it back when it ends or becomes a WebSocket
//!   (which `--max-connections` counts from then on). Over a cap the
//!   connection gets a `503` with a JSON body and is closed.
//! - **Headers and keep-alive idle**: hyper's header read timeout
//!   (`--handshake-timeout`) runs from the moment the connection waits for
//!   a request head, so it also closes an idle keep-alive connection.
//! - **Request bodies** ([`read_body`]): each part must arrive within
//!   `--http-body-timeout`, and after that first grace period the body must
//!   keep up an average of `--http-body-min-rate` bytes per second;
//!   otherwise `408` and the connection closes (what was buffered is
//!   freed).
//! - **Uploads** hold their declared length from a node-wide budget
//!   (`--max-upload-memory`) while they are read, so stalled or parallel
//!   uploads cannot hold more memory than that, whatever the allocator
//!   does with freed buffers; over it, `503` with `Retry-After`.
//! - **Responses** ([`WriteDeadline`]): a write that makes no progress for
//!   `--http-write-timeout` fails and the connection is dropped, so a
//!   client that never reads a download holds nothing for long.
//!
//! Every refusal and timeout is counted (`shoal_http_refused_total`,
//! `shoal_http_timeouts_total`).

use std::{
    collections::HashMap,
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use parking_lot::Mutex;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// Counts open HTTP connections, in total and per client address.
pub struct HttpAdmission {
    max_total: usize,
    max_per_ip: usize,
    gauge: Gauge,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Why a connection was not admitted (the metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `--max-http-connections` reached.
    Total,
    /// `--max-http-connections-per-ip` reached for this address.
    PerAddress,
}

impl Refused {
    /// Metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Total => "total",
            Refused::PerAddress => "per_address",
        }
    }
}

/// One admitted HTTP connection; dropping it frees the slot.
pub struct HttpPermit {
    adm: Arc<HttpAdmission>,
    ip: IpAddr,
}

impl HttpAdmission {
    /// `max_per_ip` 0: no per-address cap. `gauge` follows the open count.
    pub fn new(max_total: usize, max_per_ip: usize, gauge: Gauge) -> Arc<Self> {
        Arc::new(HttpAdmission {
            max_total,
            max_per_ip,
            gauge,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// Admit a connection from `ip`, or say which cap refuses it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<HttpPermit, Refused> {
        let mut g = self.open.lock();
        let (total, per_ip) = &mut *g;
        if *total >= self.max_total {
            return Err(Refused::Total);
        }
        let n = per_ip.entry(ip).or_insert(0);
        if self.max_per_ip > 0 && *n >= self.max_per_ip {
            return Err(Refused::PerAddress);
        }
        *n += 1;
        *total += 1;
        self.gauge.set(*total as i64);
        Ok(HttpPermit {
            adm: self.clone(),
            ip,
        })
    }

    /// Open HTTP connections now.
    pub fn open(&self) -> usize {
        self.open.lock().0
    }
}

impl Drop for HttpPermit {
    fn drop(&mut self) {
        let mut g = self.adm.open.lock();
        let (total, per_ip) = &mut *g;
        *total = total.saturating_sub(1);
        self.adm.gauge.set(*total as i64);
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// The answer to a connection over a cap, written before closing it.
pub fn refusal_response(why: Refused) -> Vec<u8> {
    let body = match why {
        Refused::Total => {
            r#"{"error":"unavailable","message":"too many open HTTP connections; retry later"}"#
        }
        Refused::PerAddress => {
            r#"{"error":"unavailable","message":"too many open HTTP connections from your address"}"#
        }
    };
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// How a request body may be read.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest body in bytes.
    pub max: usize,
    /// Longest wait for the next part, and the grace before `min_rate`.
    pub timeout: Duration,
    /// Slowest average rate accepted after the grace, bytes per second.
    pub min_rate: u64,
}

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Over [`BodyLimits::max`].
    TooLarge,
    /// Stalled, or slower than the minimum rate.
    TooSlow,
    /// The connection failed while reading.
    Aborted,
}

/// Read a whole request body under `limits`. `expected` (the declared
/// length, already checked against the maximum) sizes the buffer once.
pub async fn read_body(
    body: Incoming,
    limits: BodyLimits,
    expected: Option<usize>,
) -> Result<Bytes, BodyError> {
    let mut body = body;
    let start = Instant::now();
    let mut buf = BytesMut::with_capacity(expected.unwrap_or(0).min(limits.max));
    loop {
        // The body must stay above min_rate once the grace has passed:
        // `received / min_rate` seconds of credit on top of the grace.
        let credit = if limits.min_rate == 0 {
            Duration::from_secs(u32::MAX as u64)
        } else {
            Duration::from_secs_f64(buf.len() as f64 / limits.min_rate as f64)
        };
        let rate_deadline = start + limits.timeout + credit;
        let deadline = rate_deadline.min(Instant::now() + limits.timeout);
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(BodyError::TooSlow),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(_))) => return Err(BodyError::Aborted),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limits.max {
                return Err(BodyError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
}

/// An IO whose writes fail after `timeout` without progress. Reads pass
/// through; the timer exists only while a write is blocked.
pub struct WriteDeadline<T> {
    inner: T,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
    /// Counted once, when a write first times out.
    timeouts: Option<Counter>,
}

impl<T> WriteDeadline<T> {
    /// Wrap `inner`; `timeouts` counts the connection once if a write times
    /// out.
    pub fn new(inner: T, timeout: Duration, timeouts: Counter) -> Self {
        WriteDeadline {
            inner,
            timeout,
            stalled: None,
            timeouts: Some(timeouts),
        }
    }

    /// The wrapped IO (a WebSocket connection takes over its own write
    /// timeouts after the upgrade).
    pub fn into_inner(self) -> T {
        self.inner
    }

    fn pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<R>> {
        let timeout = self.timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if sleep.as_mut().poll(cx).is_ready() {
            if let Some(c) = self.timeouts.take() {
                c.inc();
            }
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "write made no progress within the write timeout",
            )));
        }
        Poll::Pending
    }

    fn track<R>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        match r {
            Poll::Pending => self.pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.track(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.track(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.track(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.track(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_caps_total_and_per_address_and_frees_on_drop() {
        let adm = HttpAdmission::new(3, 2, Gauge::default());
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let p1 = adm.admit(a).expect("1");
        let _p2 = adm.admit(a).expect("2");
        assert_eq!(adm.admit(a).err(), Some(Refused::PerAddress));
        let _p3 = adm.admit(b).expect("3");
        assert_eq!(adm.admit(b).err(), Some(Refused::Total));
        drop(p1);
        assert_eq!(adm.open(), 2);
        assert!(adm.admit(a).is_ok());
        let unlimited = HttpAdmission::new(10, 0, Gauge::default());
        let held: Vec<_> = (0..10).map(|_| unlimited.admit(a).expect("ok")).collect();
        assert_eq!(unlimited.admit(a).err(), Some(Refused::Total));
        drop(held);
        assert_eq!(unlimited.open.lock().1.len(), 0, "no entry left behind");
    }

    #[tokio::test]
    async fn a_write_without_progress_times_out_once() {
        let (client, server) = tokio::io::duplex(16);
        let fired = Counter::default();
        let mut w = WriteDeadline::new(server, Duration::from_millis(200), fired.clone());
        use tokio::io::AsyncWriteExt;
        // 16 bytes fit in the pipe; the rest never drains.
        let err = w.write_all(&[0u8; 64]).await.expect_err("stalls");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(fired.get(), 1);
        drop(client);
    }
}
