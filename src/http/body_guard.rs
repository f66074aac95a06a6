//! The request body as the handlers see it: read within `server.body_read_timeout_ms`, and
//! watched, so that a response sent before the body was read whole says `Connection: close`
//! (hyper then drops the connection; a client that reuses it must be told, or its next request
//! on it fails).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};

/// The body did not arrive within `server.body_read_timeout_ms`.
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received within {0:?}")]
pub struct BodyReadTimeout(pub Duration);

/// Whether `e` (or what caused it) is a [`BodyReadTimeout`].
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.is::<BodyReadTimeout>() {
            return true;
        }
        cur = c.source();
    }
    false
}

/// Wraps the request body (deadline, end watched); adds `Connection: close` to a response sent
/// while the body was still unread.
pub async fn guard(State(timeout): State<Duration>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    if http_body::Body::is_end_stream(&body) {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let finished = Arc::new(AtomicBool::new(false));
    let guarded = GuardedBody {
        inner: body,
        finished: finished.clone(),
        timeout,
        deadline: Box::pin(tokio::time::sleep(timeout)),
    };
    let mut resp = next
        .run(Request::from_parts(parts, Body::new(guarded)))
        .await;
    if !finished.load(Ordering::Acquire) {
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    resp
}

struct GuardedBody {
    inner: Body,
    finished: Arc<AtomicBool>,
    timeout: Duration,
    /// When the whole body must have arrived (from when its headers did).
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.finished.load(Ordering::Relaxed) {
            return Poll::Ready(None);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyReadTimeout(self.timeout)))));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(None) => {
                self.finished.store(true, Ordering::Release);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if self.inner.is_end_stream() {
                    self.finished.store(true, Ordering::Release);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished.load(Ordering::Relaxed) || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
