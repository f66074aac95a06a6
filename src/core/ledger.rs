//! Writes usage-ledger rows off the request path, in batches. A failed write is retried with
//! the rows kept in memory; shutdown flushes whatever is queued.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::store::{NewLedgerRow, Store};

enum Command {
    Row(Box<NewLedgerRow>),
    Flush(oneshot::Sender<()>),
}

/// The sending side: cheap to clone, never blocks a request.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::UnboundedSender<Command>,
}

impl Ledger {
    /// Starts the background writer.
    pub fn start(store: Store, batch_size: usize, flush_every: Duration) -> Ledger {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(
            store,
            rx,
            batch_size.max(1),
            flush_every.max(Duration::from_millis(1)),
        ));
        Ledger { tx }
    }

    /// Queues a row.
    pub fn record(&self, row: NewLedgerRow) {
        if self.tx.send(Command::Row(Box::new(row))).is_err() {
            tracing::error!("ledger writer is gone; a usage row was not recorded");
        }
    }

    /// Waits until every row queued before this call is written.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Command::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

async fn writer(
    store: Store,
    mut rx: mpsc::UnboundedReceiver<Command>,
    batch_size: usize,
    every: Duration,
) {
    let mut batch: Vec<NewLedgerRow> = Vec::with_capacity(batch_size);
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    // When the oldest row in `batch` must be written at the latest.
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut closed = false;
    while !closed {
        let cmd = match deadline {
            None => rx.recv().await,
            Some(d) => tokio::time::timeout_at(d, rx.recv()).await.unwrap_or(None),
        };
        let mut next = cmd;
        if next.is_none() && rx.is_closed() && rx.is_empty() {
            closed = true;
        }
        // Take the command and whatever else is already queued, up to a batch.
        while let Some(c) = next.take() {
            match c {
                Command::Row(r) => batch.push(*r),
                Command::Flush(done) => waiting.push(done),
            }
            if batch.len() >= batch_size || !waiting.is_empty() {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !batch.is_empty() && deadline.is_none() {
            deadline = Some(tokio::time::Instant::now() + every);
        }
        let due = closed
            || batch.len() >= batch_size
            || !waiting.is_empty()
            || deadline.is_some_and(|d| d <= tokio::time::Instant::now());
        if due {
            write_with_retry(&store, std::mem::take(&mut batch).into()).await;
            deadline = None;
            for w in waiting.drain(..) {
                let _ = w.send(());
            }
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
