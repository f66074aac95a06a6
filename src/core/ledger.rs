//! Writes usage-ledger rows off the request path, in batches. A failed write is retried with
//! the rows kept in memory; shutdown flushes whatever is queued.

use std::sync::Arc;
use std::time::Duration;

use super::batch_queue::{BatchQueue, Linger, Producer};
use crate::store::{NewLedgerRow, Store};

/// The sending side: cheap to clone, never blocks a request (a push onto the writer's
/// [`BatchQueue`]). The last clone to go closes the queue, and the writer exits once it has
/// written what was in it.
#[derive(Clone)]
pub struct Ledger {
    queue: Arc<Producer<NewLedgerRow>>,
}

impl Ledger {
    /// Starts the background writer: a batch is written once it has `batch_size` rows, or
    /// `flush_every` after its first row came, whichever is sooner.
    pub fn start(store: Store, batch_size: usize, flush_every: Duration) -> Ledger {
        let (producer, queue) = BatchQueue::open(batch_size);
        let every = flush_every.max(Duration::from_millis(1));
        tokio::spawn(writer(
            store,
            queue,
            Linger {
                usual: every,
                urgent: every,
            },
        ));
        Ledger {
            queue: Arc::new(producer),
        }
    }

    /// Queues a row.
    pub fn record(&self, row: NewLedgerRow) {
        self.queue.push(row, false);
    }

    /// Waits until every row queued before this call is written.
    pub async fn flush(&self) {
        self.queue.flush().await;
    }
}

async fn writer(store: Store, queue: Arc<BatchQueue<NewLedgerRow>>, linger: Linger) {
    loop {
        let mut taken = queue.next_batch(linger).await;
        while let Some(rows) = taken.next_chunk() {
            write_with_retry(&store, rows.into()).await;
        }
        let closed = taken.closed;
        taken.answer_flushes();
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
