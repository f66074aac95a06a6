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
use axum::extract::Request;
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

/// Wraps each request body (deadline, end watched) and adds `Connection: close` to a response
/// sent while the body was still unread. A tower layer, not `axum::middleware::from_fn`: that
/// boxes the inner service and the future of every request.
#[derive(Clone)]
pub struct BodyGuardLayer {
    timeout: Duration,
}

impl BodyGuardLayer {
    /// Bodies must arrive whole within `timeout` of their headers.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> tower::Layer<S> for BodyGuardLayer {
    type Service = BodyGuard<S>;
    fn layer(&self, inner: S) -> BodyGuard<S> {
        BodyGuard {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service of [`BodyGuardLayer`].
#[derive(Clone)]
pub struct BodyGuard<S> {
    inner: S,
    timeout: Duration,
}

impl<S> tower::Service<Request> for BodyGuard<S>
where
    S: tower::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = GuardedResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let (parts, body) = req.into_parts();
        if http_body::Body::is_end_stream(&body) {
            return GuardedResponse {
                inner: self.inner.call(Request::from_parts(parts, body)),
                finished: None,
            };
        }
        let finished = Arc::new(AtomicBool::new(false));
        let guarded = GuardedBody {
            inner: body,
            finished: finished.clone(),
            timeout: self.timeout,
            due: tokio::time::Instant::now() + self.timeout,
            deadline: None,
        };
        GuardedResponse {
            inner: self
                .inner
                .call(Request::from_parts(parts, Body::new(guarded))),
            finished: Some(finished),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of a guarded request: `Connection: close` when its body was left unread.
    pub struct GuardedResponse<F> {
        #[pin]
        inner: F,
        finished: Option<Arc<AtomicBool>>,
    }
}

impl<F, E> Future for GuardedResponse<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut resp = std::task::ready!(this.inner.poll(cx))?;
        if this
            .finished
            .as_ref()
            .is_some_and(|f| !f.load(Ordering::Acquire))
        {
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        Poll::Ready(Ok(resp))
    }
}

struct GuardedBody {
    inner: Body,
    finished: Arc<AtomicBool>,
    timeout: Duration,
    /// When the whole body must have arrived (from when its headers did).
    due: tokio::time::Instant,
    /// The timer of `due`, set the first time the body is not there yet: most bodies came
    /// with their headers and are read whole at once, without a timer ever being made.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl GuardedBody {
    /// Whether the deadline has passed; a pending timer is registered to wake `cx`.
    fn timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }
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
        if self.timed_out(cx) {
            return Poll::Ready(Some(Err(Box::new(BodyReadTimeout(self.timeout)))));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_pending() && self.deadline.is_none() {
            // The body is late: from now on the timer wakes this task at `due`.
            self.deadline = Some(Box::pin(tokio::time::sleep_until(self.due)));
            if self.timed_out(cx) {
                return Poll::Ready(Some(Err(Box::new(BodyReadTimeout(self.timeout)))));
            }
        }
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
