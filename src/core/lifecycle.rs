//! Where the process is in its shutdown, as the core sees it: draining (readiness answers 503
//! so load balancers stop sending, requests are still served) and, once the grace period is
//! over, cutting the streams still running so that each ends with an error event and is
//! recorded before the ledger is flushed (instead of vanishing with the process).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Context;

use tokio::sync::watch;

/// Shared by the gateway, every stream and the server's shutdown.
#[derive(Clone)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

struct Inner {
    draining: AtomicBool,
    cut: watch::Sender<bool>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    /// Serving, nothing cut.
    pub fn new() -> Lifecycle {
        Lifecycle {
            inner: Arc::new(Inner {
                draining: AtomicBool::new(false),
                cut: watch::Sender::new(false),
            }),
        }
    }

    /// Shutdown has begun: the replica is no longer ready.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// The grace period is over: every stream still running ends now.
    pub fn cut_streams(&self) {
        self.inner.cut.send_replace(true);
    }

    /// Resolves when [`Lifecycle::cut_streams`] is called (at once if it was).
    pub fn stream_cut(&self) -> StreamCut {
        let mut rx = self.inner.cut.subscribe();
        StreamCut(Box::pin(async move {
            let _ = rx.wait_for(|cut| *cut).await;
        }))
    }
}

/// A stream's view of the cut: polled before each upstream read.
pub struct StreamCut(Pin<Box<dyn Future<Output = ()> + Send>>);

impl StreamCut {
    /// Ready once the streams are cut; registers the waker otherwise.
    pub fn poll_cut(&mut self, cx: &mut Context<'_>) -> bool {
        self.0.as_mut().poll(cx).is_ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cut_reaches_streams_made_before_and_after_it() {
        let life = Lifecycle::new();
        assert!(!life.is_draining());
        let mut before = life.stream_cut();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(!before.poll_cut(&mut cx));
        life.start_draining();
        assert!(life.is_draining());
        assert!(!before.poll_cut(&mut cx), "draining alone cuts nothing");
        life.cut_streams();
        assert!(before.poll_cut(&mut cx));
        assert!(life.stream_cut().poll_cut(&mut cx));
    }
}
