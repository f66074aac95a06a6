//! Writes usage-ledger rows off the request path, in batches. A failed write is retried with
//! the rows kept in memory; shutdown flushes whatever is queued.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};

use crate::store::{NewLedgerRow, Store};

/// The sending side: cheap to clone, never blocks a request. The last clone to go closes the
/// queue, and the writer exits once it has written what was in it.
#[derive(Clone)]
pub struct Ledger {
    handle: Arc<Handle>,
}

/// Held by every [`Ledger`] clone; dropping the last one tells the writer to finish.
struct Handle {
    queue: Arc<Queue>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.wake.notify_one();
    }
}

/// Rows waiting for the writer. A row is pushed under a lock no request holds for more than a
/// push, and the writer is woken only when it has something to do: the first row of a batch
/// (to start its linger), a full batch, a flush or the close. A channel woke it for every row
/// (a task poll and a timer set and cancelled each time) and boxed every row.
struct Queue {
    pending: Mutex<Pending>,
    wake: Notify,
    batch_size: usize,
}

#[derive(Default)]
struct Pending {
    rows: Vec<NewLedgerRow>,
    flushes: Vec<oneshot::Sender<()>>,
    closed: bool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic while pushing a row leaves the queue whole: keep going with it.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Ledger {
    /// Starts the background writer: a batch is written once it has `batch_size` rows, or
    /// `flush_every` after its first row came, whichever is sooner.
    pub fn start(store: Store, batch_size: usize, flush_every: Duration) -> Ledger {
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            batch_size: batch_size.max(1),
        });
        tokio::spawn(writer(
            store,
            queue.clone(),
            flush_every.max(Duration::from_millis(1)),
        ));
        Ledger {
            handle: Arc::new(Handle { queue }),
        }
    }

    /// Queues a row.
    pub fn record(&self, row: NewLedgerRow) {
        let queue = &self.handle.queue;
        let queued = {
            let mut p = queue.lock();
            p.rows.push(row);
            p.rows.len()
        };
        if queued == 1 || queued == queue.batch_size {
            queue.wake.notify_one();
        }
    }

    /// Waits until every row queued before this call is written.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        let queue = &self.handle.queue;
        queue.lock().flushes.push(done);
        queue.wake.notify_one();
        // The writer answers every flush it takes, and takes them all before it exits.
        let _ = wait.await;
    }
}

/// What the writer found in the queue.
enum Due {
    /// Nothing queued: wait for a wake.
    Idle,
    /// Rows queued, the batch neither full nor asked for: linger.
    Gathering,
    /// Write now (a full batch, a flush or the close).
    Now,
}

async fn writer(store: Store, queue: Arc<Queue>, every: Duration) {
    // When the batch being gathered must be written at the latest.
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let due = {
            let p = queue.lock();
            if p.closed || !p.flushes.is_empty() || p.rows.len() >= queue.batch_size {
                Due::Now
            } else if p.rows.is_empty() {
                Due::Idle
            } else {
                Due::Gathering
            }
        };
        match due {
            Due::Idle => {
                deadline = None;
                queue.wake.notified().await;
                continue;
            }
            Due::Gathering => {
                let d = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + every);
                if tokio::time::Instant::now() < d {
                    // Woken early by a full batch, a flush or the close: look again.
                    let _ = tokio::time::timeout_at(d, queue.wake.notified()).await;
                    continue;
                }
            }
            Due::Now => {}
        }
        deadline = None;
        let (rows, flushes, closed) = {
            let mut p = queue.lock();
            // Room for as many as came this time, so that the next batch grows in place.
            let room = p.rows.len().min(queue.batch_size);
            (
                std::mem::replace(&mut p.rows, Vec::with_capacity(room)),
                std::mem::take(&mut p.flushes),
                p.closed,
            )
        };
        // Rows that came faster than batches were written go in batches of the configured size.
        let mut rows = rows.into_iter();
        loop {
            let batch: Arc<[NewLedgerRow]> = rows.by_ref().take(queue.batch_size).collect();
            if batch.is_empty() {
                break;
            }
            write_with_retry(&store, batch).await;
        }
        for f in flushes {
            let _ = f.send(());
        }
        if closed {
            break;
        }
    }
}

async fn write_with_retry(store: &Store, rows: Arc<[NewLedgerRow]>) {
    let Some(first) = rows.first() else {
        return;
    };
    write_exactly_once("ledger write", rows.len(), Some(first), store, || {
        store.insert_ledger_rows(&rows)
    })
    .await
}

/// Writes one batch (one transaction) until it is stored, retrying with backoff, and never
/// twice: after a failed attempt, whose commit may have been acknowledged to nobody (the
/// connection died), the batch's ledger row `probe` tells whether it is stored already.
pub(crate) async fn write_exactly_once<F, Fut>(
    what: &'static str,
    batch: usize,
    probe: Option<&NewLedgerRow>,
    store: &Store,
    mut write: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::store::StoreError>>,
{
    let mut backoff = Duration::from_millis(50);
    let mut failed = false;
    loop {
        let outcome = match (failed, probe) {
            (true, Some(row)) => match store.ledger_row_exists(row).await {
                Ok(true) => {
                    tracing::warn!(batch, "a {what} that seemed to fail had committed");
                    return;
                }
                Ok(false) => write().await,
                Err(e) => Err(e),
            },
            _ => write().await,
        };
        match outcome {
            Ok(()) => return,
            Err(e) => {
                failed = true;
                tracing::warn!(error = %e, batch, "{what} failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
