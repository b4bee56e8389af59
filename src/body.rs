//! Body wrappers: bytes are counted as they stream, and a request's one log line and
//! metrics record are emitted when its response body ends (or is dropped), so long SSE
//! streams and downloads are measured to their real end without ever being buffered.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use crate::metrics::{Direction, Metrics};
use crate::observe::RequestRecord;

/// What one body did: bytes that passed, and whether it failed (the peer broke off, or
/// framed it wrongly). Shared between the body and the request's record.
#[derive(Debug, Default)]
pub struct BodyStats {
    bytes: AtomicU64,
    failed: AtomicBool,
}

impl BodyStats {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Stats of a body scopegate already holds whole.
    pub fn complete(bytes: u64) -> Arc<Self> {
        Arc::new(Self {
            bytes: AtomicU64::new(bytes),
            failed: AtomicBool::new(false),
        })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

pin_project! {
    /// Passes frames through unchanged, adding each data frame's length to the shared
    /// stats (for the log line) and to the body-bytes metric, and noting a failure.
    pub struct CountingBody<B> {
        #[pin]
        inner: B,
        stats: Arc<BodyStats>,
        metrics: Metrics,
        direction: Direction,
    }
}

impl<B> CountingBody<B> {
    pub fn new(inner: B, stats: Arc<BodyStats>, metrics: Metrics, direction: Direction) -> Self {
        Self {
            inner,
            stats,
            metrics,
            direction,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for CountingBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    this.stats.bytes.fetch_add(n, Ordering::Relaxed);
                    this.metrics.body_bytes(*this.direction, n);
                }
            }
            Poll::Ready(Some(Err(_))) => this.stats.failed.store(true, Ordering::Relaxed),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What the upstream client sends: a client's streamed body, or a small body of our own.
pub type UpstreamBody = Either<CountingBody<Incoming>, Full<Bytes>>;

pin_project! {
    /// Every response scopegate sends. The record is finished when this body is dropped:
    /// after the last frame, or when the client went away mid-stream.
    pub struct ResponseBody {
        #[pin]
        inner: Either<Full<Bytes>, CountingBody<Incoming>>,
        record: RecordOnDrop,
    }
}

impl ResponseBody {
    /// A body scopegate wrote itself (refusals, admin answers).
    pub fn full(bytes: impl Into<Bytes>, record: Option<RequestRecord>) -> Self {
        Self {
            inner: Either::Left(Full::new(bytes.into())),
            record: RecordOnDrop(record),
        }
    }

    /// The upstream's body, streamed.
    pub fn streamed(inner: CountingBody<Incoming>, record: Option<RequestRecord>) -> Self {
        Self {
            inner: Either::Right(inner),
            record: RecordOnDrop(record),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            // The upstream failed after the head: the client connection is aborted by
            // hyper (it must not look complete); note it in the log line.
            if let Some(record) = this.record.0.as_mut() {
                record.mark_aborted();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

struct RecordOnDrop(Option<RequestRecord>);

impl Drop for RecordOnDrop {
    fn drop(&mut self) {
        if let Some(record) = self.0.take() {
            record.finish();
        }
    }
}
