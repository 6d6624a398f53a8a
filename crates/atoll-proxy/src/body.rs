//! Request and response bodies of the data path: streamed through untouched,
//! buffered only when a key source reads the body, and copied for a mirror
//! without holding the primary back.

use std::pin::Pin;
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

/// The body sent upstream.
pub(crate) enum RequestBody {
    /// No body.
    Empty,
    /// A buffered body (read to find a key, or replayed for a retry).
    Full(Option<Bytes>),
    /// The client's body, streamed.
    Stream(Incoming),
    /// The client's body, streamed, with a copy kept for a mirror.
    Tee(Incoming, Capture),
}

impl RequestBody {
    /// A copy for another try, when the body can be replayed.
    pub(crate) fn replay(&self) -> Option<RequestBody> {
        match self {
            RequestBody::Empty => Some(RequestBody::Empty),
            RequestBody::Full(bytes) => Some(RequestBody::Full(bytes.clone())),
            RequestBody::Stream(_) | RequestBody::Tee(..) => None,
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
            RequestBody::Stream(inner) => Pin::new(inner).poll_frame(cx),
            RequestBody::Tee(inner, capture) => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
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
            RequestBody::Stream(inner) | RequestBody::Tee(inner, _) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            RequestBody::Stream(inner) | RequestBody::Tee(inner, _) => inner.size_hint(),
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
