//! Request and response bodies of the data path: streamed through untouched,
//! buffered only when a key source reads the body, and copied for a mirror
//! without holding the primary back.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::oneshot;

use crate::upstream::InFlight;

/// A copy of a request body for a mirror, handed over when the body ends.
pub(crate) struct Capture {
    chunks: Vec<Bytes>,
    size: usize,
    limit: usize,
    done: Option<oneshot::Sender<Bytes>>,
}

impl Capture {
    pub(crate) fn new(limit: usize) -> (Self, oneshot::Receiver<Bytes>) {
        let (done, receiver) = oneshot::channel();
        (
            Self {
                chunks: Vec::new(),
                size: 0,
                limit,
                done: Some(done),
            },
            receiver,
        )
    }

    /// Keeps a chunk; a body over the limit abandons the copy.
    fn keep(&mut self, chunk: &Bytes) {
        if self.done.is_none() {
            return;
        }
        self.size += chunk.len();
        if self.size > self.limit {
            self.done = None;
            self.chunks.clear();
            return;
        }
        self.chunks.push(chunk.clone());
    }

    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            let mut body = BytesMut::with_capacity(self.size);
            for chunk in self.chunks.drain(..) {
                body.extend_from_slice(&chunk);
            }
            let _ = done.send(body.freeze());
        }
    }
}

/// What the client's side of a streamed request body did, so that a failed
/// exchange is blamed on whoever failed: a malformed or stalled body is the
/// client's fault, not the upstream's.
#[derive(Debug, Default)]
pub(crate) struct BodyWatch {
    /// The body is not complete and its last poll found nothing from the
    /// client (the upstream side was ready for more).
    waiting: AtomicBool,
    /// How reading the client's body failed: `Some(message)` for a
    /// malformed body, `None` inside for a client that went away.
    failed: OnceLock<Option<String>>,
}

impl BodyWatch {
    /// Whether the exchange is waiting for the client's body.
    pub(crate) fn waiting_for_client(&self) -> bool {
        self.waiting.load(Ordering::Relaxed)
    }

    /// How reading the client's body failed, if it did: `Some(None)`: the
    /// client went away; `Some(Some(why))`: its body is malformed.
    pub(crate) fn failure(&self) -> Option<Option<&str>> {
        self.failed.get().map(Option::as_deref)
    }

    fn observe<T>(&self, polled: &Poll<Option<Result<T, hyper::Error>>>) {
        match polled {
            Poll::Pending => self.waiting.store(true, Ordering::Relaxed),
            Poll::Ready(Some(Err(error))) => {
                self.waiting.store(false, Ordering::Relaxed);
                let gone =
                    error.is_incomplete_message() || error.is_closed() || error.is_canceled();
                let _ = self.failed.set((!gone).then(|| error.to_string()));
            }
            Poll::Ready(_) => self.waiting.store(false, Ordering::Relaxed),
        }
    }
}

/// The body sent upstream.
pub(crate) enum RequestBody {
    /// No body.
    Empty,
    /// A buffered body (read to find a key, or replayed for a retry).
    Full(Option<Bytes>),
    /// The client's body, streamed.
    Stream(Incoming, Arc<BodyWatch>),
    /// The client's body, streamed, with a copy kept for a mirror.
    Tee(Incoming, Capture, Arc<BodyWatch>),
}

impl RequestBody {
    /// The client's body, streamed, watched.
    pub(crate) fn stream(body: Incoming) -> Self {
        RequestBody::Stream(body, Arc::default())
    }

    /// What the client's side of a streamed body did.
    pub(crate) fn watch(&self) -> Option<Arc<BodyWatch>> {
        match self {
            RequestBody::Stream(_, watch) | RequestBody::Tee(_, _, watch) => Some(watch.clone()),
            RequestBody::Empty | RequestBody::Full(_) => None,
        }
    }

    /// A copy for another try, when the body can be replayed.
    pub(crate) fn replay(&self) -> Option<RequestBody> {
        match self {
            RequestBody::Empty => Some(RequestBody::Empty),
            RequestBody::Full(bytes) => Some(RequestBody::Full(bytes.clone())),
            RequestBody::Stream(..) | RequestBody::Tee(..) => None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            RequestBody::Stream(inner, watch) => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                watch.observe(&polled);
                polled
            }
            RequestBody::Tee(inner, capture, watch) => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                watch.observe(&polled);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            capture.keep(data);
                        }
                        // hyper stops polling once a body with a known length
                        // says it has ended: hand the copy over now.
                        if inner.is_end_stream() {
                            capture.finish();
                        }
                    }
                    Poll::Ready(None) => capture.finish(),
                    Poll::Ready(Some(Err(_))) => capture.done = None,
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Full(bytes) => bytes.is_none(),
            RequestBody::Stream(inner, _) | RequestBody::Tee(inner, ..) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            RequestBody::Stream(inner, _) | RequestBody::Tee(inner, ..) => inner.size_hint(),
        }
    }
}

/// The body sent to the client: an answer of the proxy itself, or the
/// upstream's body streamed (the endpoint counts the request in flight until
/// it ends).
pub struct ResponseBody(Inner);

enum Inner {
    Full(Option<Bytes>),
    Upstream(Incoming, Option<InFlight>),
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Inner::Full(_) => f.write_str("ResponseBody::Full"),
            Inner::Upstream(..) => f.write_str("ResponseBody::Upstream"),
        }
    }
}

impl ResponseBody {
    /// A body of the proxy's own.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self(Inner::Full(Some(bytes.into())))
    }

    /// No body.
    pub fn empty() -> Self {
        Self(Inner::Full(None))
    }

    pub(crate) fn upstream(body: Incoming, in_flight: InFlight) -> Self {
        Self(Inner::Upstream(body, Some(in_flight)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().0 {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Upstream(inner, in_flight) => {
                let polled = Pin::new(inner).poll_frame(cx);
                if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
                    in_flight.take();
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Full(bytes) => bytes.is_none(),
            Inner::Upstream(inner, _) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Inner::Upstream(inner, _) => inner.size_hint(),
        }
    }
}

/// Why a body could not be buffered.
#[derive(Debug)]
pub(crate) enum BufferError {
    TooLarge,
    Failed(String),
}

/// Reads a whole body, refusing more than `limit` bytes.
pub(crate) async fn buffer(body: Incoming, limit: usize) -> Result<Bytes, BufferError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(BufferError::TooLarge);
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => {
            if error
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(BufferError::TooLarge)
            } else {
                Err(BufferError::Failed(error.to_string()))
            }
        }
    }
}
