//! The queue between requests and a background writer that writes what they leave in batches
//! (the ledger writer, the budget settlement writer). A request pushes under a lock held for a
//! push, and the writer is woken only when it has something to do: the first item of a batch
//! (to start its linger), an urgent item (to shorten it), a full batch, a flush or the close.
//! A channel woke the writer for every item, a task poll and a linger timer set and cancelled
//! each time, and boxed every item.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

/// The requests' side of a queue: dropping it closes the queue, and the writer takes what is
/// left and stops.
pub(crate) struct Producer<T>(Arc<BatchQueue<T>>);

impl<T> std::ops::Deref for Producer<T> {
    type Target = BatchQueue<T>;
    fn deref(&self) -> &BatchQueue<T> {
        &self.0
    }
}

impl<T> Drop for Producer<T> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Items waiting for their writer.
pub(crate) struct BatchQueue<T> {
    state: Mutex<State<T>>,
    wake: Notify,
    batch_size: usize,
}

struct State<T> {
    items: Vec<T>,
    flushes: Vec<oneshot::Sender<()>>,
    urgent: bool,
    closed: bool,
}

/// How long a batch is gathered after its first item: `urgent` once an urgent item is in it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Linger {
    pub usual: Duration,
    pub urgent: Duration,
}

/// What the writer takes at once: every queued item (written `batch_size` at a time, by
/// [`Taken::next_chunk`]), the flushes to answer once they are written, and whether the queue
/// is closed (the writer's last batch).
pub(crate) struct Taken<T> {
    items: std::vec::IntoIter<T>,
    batch_size: usize,
    flushes: Vec<oneshot::Sender<()>>,
    pub closed: bool,
}

impl<T> Taken<T> {
    /// The next `batch_size` items or fewer (items that came faster than batches were written
    /// go in several); `None` once all are out.
    pub fn next_chunk(&mut self) -> Option<Vec<T>> {
        let chunk: Vec<T> = self.items.by_ref().take(self.batch_size).collect();
        (!chunk.is_empty()).then_some(chunk)
    }

    /// Tells every flush taken with these items that they are written.
    pub fn answer_flushes(self) {
        for f in self.flushes {
            let _ = f.send(());
        }
    }
}

impl<T> BatchQueue<T> {
    /// An empty queue whose batches are written at `batch_size` items at most: the requests'
    /// side, and the writer's.
    pub fn open(batch_size: usize) -> (Producer<T>, Arc<BatchQueue<T>>) {
        let queue = Arc::new(Self::new(batch_size));
        (Producer(queue.clone()), queue)
    }

    fn new(batch_size: usize) -> BatchQueue<T> {
        BatchQueue {
            state: Mutex::new(State {
                items: Vec::new(),
                flushes: Vec::new(),
                urgent: false,
                closed: false,
            }),
            wake: Notify::new(),
            batch_size: batch_size.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while pushing leaves the queue whole: keep going with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item`; an `urgent` one cuts its batch's linger to the urgent one.
    pub fn push(&self, item: T, urgent: bool) {
        let wake = {
            let mut s = self.lock();
            s.items.push(item);
            let first_urgent = urgent && !s.urgent;
            s.urgent |= urgent;
            s.items.len() == 1 || s.items.len() == self.batch_size || first_urgent
        };
        if wake {
            self.wake.notify_one();
        }
    }

    /// Waits until every item queued before this call is written (at once if the writer is
    /// gone: nothing will be).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        {
            let mut s = self.lock();
            if s.closed {
                return;
            }
            s.flushes.push(done);
        }
        self.wake.notify_one();
        let _ = wait.await;
    }

    /// Closes the queue: the writer takes what is left and stops.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// Waits until a batch is due (its linger is up, it is full, a flush asks or the queue
    /// closed) and takes it. Dropping the future before it returns takes nothing, so it can
    /// race a timer in `select!`.
    pub async fn next_batch(&self, linger: Linger) -> Taken<T> {
        // When the batch being gathered came, and so when it is due.
        let mut first_seen: Option<Instant> = None;
        loop {
            let due = {
                let mut s = self.lock();
                let due = if s.closed || !s.flushes.is_empty() || s.items.len() >= self.batch_size {
                    None
                } else if s.items.is_empty() {
                    first_seen = None;
                    Some(None)
                } else {
                    let since = *first_seen.get_or_insert_with(Instant::now);
                    let at = since
                        + if s.urgent {
                            linger.urgent
                        } else {
                            linger.usual
                        };
                    (at > Instant::now()).then_some(Some(at))
                };
                match due {
                    Some(due) => due,
                    None => return self.take(&mut s),
                }
            };
            match due {
                None => self.wake.notified().await,
                // Woken early by an urgent item, a full batch, a flush or the close: look again.
                Some(at) => {
                    let _ = tokio::time::timeout_at(at, self.wake.notified()).await;
                }
            }
        }
    }

    fn take(&self, s: &mut State<T>) -> Taken<T> {
        // Room for as many as came this time, so that the next batch grows in place.
        let room = s.items.len().min(self.batch_size);
        s.urgent = false;
        Taken {
            items: std::mem::replace(&mut s.items, Vec::with_capacity(room)).into_iter(),
            batch_size: self.batch_size,
            flushes: std::mem::take(&mut s.flushes),
            closed: s.closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINGER: Linger = Linger {
        usual: Duration::from_millis(50),
        urgent: Duration::from_millis(10),
    };

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_taken_when_its_linger_is_up() {
        let q = BatchQueue::new(100);
        let start = Instant::now();
        q.push(1, false);
        q.push(2, false);
        let mut taken = q.next_batch(LINGER).await;
        assert_eq!(taken.next_chunk(), Some(vec![1, 2]));
        assert_eq!(start.elapsed(), LINGER.usual);
    }

    #[tokio::test(start_paused = true)]
    async fn an_urgent_item_cuts_the_linger_and_the_next_batch_lingers_as_usual() {
        let q = BatchQueue::new(100);
        let start = Instant::now();
        q.push(1, false);
        q.push(2, true);
        assert_eq!(q.next_batch(LINGER).await.next_chunk(), Some(vec![1, 2]));
        assert_eq!(start.elapsed(), LINGER.urgent);
        let start = Instant::now();
        q.push(3, false);
        assert_eq!(q.next_batch(LINGER).await.next_chunk(), Some(vec![3]));
        assert_eq!(start.elapsed(), LINGER.usual);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_and_a_close_are_taken_at_once() {
        let q = BatchQueue::new(3);
        let start = Instant::now();
        for i in 0..5 {
            q.push(i, false);
        }
        let mut taken = q.next_batch(LINGER).await;
        assert_eq!(
            taken.next_chunk(),
            Some(vec![0, 1, 2]),
            "all that is queued"
        );
        assert_eq!(taken.next_chunk(), Some(vec![3, 4]), "in batches");
        assert_eq!(taken.next_chunk(), None);
        assert!(!taken.closed);
        assert_eq!(start.elapsed(), Duration::ZERO);
        q.push(5, false);
        q.close();
        let mut taken = q.next_batch(LINGER).await;
        assert_eq!((taken.next_chunk(), taken.closed), (Some(vec![5]), true));
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_takes_the_batch_and_waits_until_it_is_answered() {
        let q = std::sync::Arc::new(BatchQueue::new(100));
        q.push(1, false);
        let flushing = tokio::spawn({
            let q = q.clone();
            async move { q.flush().await }
        });
        let start = Instant::now();
        let mut taken = q.next_batch(LINGER).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(taken.next_chunk(), Some(vec![1]));
        assert!(!flushing.is_finished());
        taken.answer_flushes();
        flushing.await.expect("the flush returns once answered");
        // A closed queue's flush returns at once.
        q.close();
        q.flush().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_wait_takes_nothing() {
        let q = BatchQueue::new(100);
        q.push(1, false);
        let r = tokio::time::timeout(Duration::from_millis(5), q.next_batch(LINGER)).await;
        assert!(r.is_err());
        assert_eq!(q.next_batch(LINGER).await.next_chunk(), Some(vec![1]));
    }
}
