//! Gathers concurrent requests into batches, for a sink whose backend does many items in
//! one call much more cheaply than one call each (the Celery sink: one Redis script call).
//!
//! Callers `submit` an item and wait for its own answer. One flusher at a time (a task
//! spawned when the first item arrives while none runs) takes everything waiting, up to
//! `BatchLimits`, and runs one flush for it; items that arrive meanwhile wait for the next
//! flush. An idle batcher adds no delay: a lone item is flushed at once, and batches form
//! only from items that arrived while a flush was in flight.
//!
//! The flusher is a task of its own, not a caller's future: a caller that stops waiting
//! (the dispatcher's per-attempt timeout drops its future) only loses its answer, and
//! its item is skipped if its flush has not started yet.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// How large one flush may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_items: usize,
    /// A batch's items together stay within this many bytes (by `Flush::size`), unless
    /// its first item alone is larger: that one goes alone.
    pub max_bytes: usize,
}

/// How many of the waiting items (by size, oldest first) the next batch takes: as many as
/// fit the limits, and at least one if any waits.
pub fn batch_len(sizes: impl IntoIterator<Item = usize>, limits: BatchLimits) -> usize {
    let mut n = 0;
    let mut bytes = 0usize;
    for size in sizes {
        if n == limits.max_items || (n > 0 && bytes.saturating_add(size) > limits.max_bytes) {
            break;
        }
        n += 1;
        bytes = bytes.saturating_add(size);
    }
    n
}

/// What runs a batch.
pub trait Flush: Send + Sync + 'static {
    type Item: Send + 'static;
    type Output: Send + 'static;

    /// The bytes an item adds to a batch, for `BatchLimits::max_bytes`.
    fn size(item: &Self::Item) -> usize;

    /// Handles `items` together and answers one output per item, in their order. Errors
    /// belong in `Output` (a failed call fails every item in it).
    fn flush<'a>(
        &'a self,
        items: &'a [Self::Item],
    ) -> Pin<Box<dyn Future<Output = Vec<Self::Output>> + Send + 'a>>;
}

struct Waiting<F: Flush> {
    item: F::Item,
    reply: oneshot::Sender<F::Output>,
}

struct State<F: Flush> {
    waiting: VecDeque<Waiting<F>>,
    /// Whether a flusher task runs; it clears this itself, under the lock, when it finds
    /// nothing waiting.
    flushing: bool,
}

struct Inner<F: Flush> {
    flush: F,
    limits: BatchLimits,
    state: Mutex<State<F>>,
    n_flushes: AtomicU64,
}

impl<F: Flush> Inner<F> {
    fn state(&self) -> MutexGuard<'_, State<F>> {
        // Nothing panics while holding the lock, but a poisoned lock must not stop delivery.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub struct Batcher<F: Flush> {
    inner: Arc<Inner<F>>,
}

impl<F: Flush> Batcher<F> {
    pub fn new(flush: F, limits: BatchLimits) -> Batcher<F> {
        assert!(limits.max_items > 0, "a batch holds at least one item");
        Batcher {
            inner: Arc::new(Inner {
                flush,
                limits,
                state: Mutex::new(State {
                    waiting: VecDeque::new(),
                    flushing: false,
                }),
                n_flushes: AtomicU64::new(0),
            }),
        }
    }

    pub fn flusher(&self) -> &F {
        &self.inner.flush
    }

    /// Flushes run so far.
    pub fn n_flushes(&self) -> u64 {
        self.inner.n_flushes.load(Ordering::Relaxed)
    }

    /// Queues `item` for the next flush and waits for its output; `None` if the flusher
    /// was stopped before answering (its runtime shut down). Must be called within a
    /// tokio runtime.
    pub async fn submit(&self, item: F::Item) -> Option<F::Output> {
        let (reply, answer) = oneshot::channel();
        let start_flusher = {
            let mut state = self.inner.state();
            state.waiting.push_back(Waiting { item, reply });
            !std::mem::replace(&mut state.flushing, true)
        };
        if start_flusher {
            tokio::spawn(run_flusher(self.inner.clone()));
        }
        answer.await.ok()
    }
}

/// Clears `flushing` and drops whatever waits if the flusher task ends without doing so
/// itself (cancelled at runtime shutdown, or a flush panicked), so waiting callers get
/// `None` and the next `submit` starts a new flusher.
struct StopGuard<'a, F: Flush> {
    inner: &'a Inner<F>,
    armed: bool,
}

impl<F: Flush> Drop for StopGuard<'_, F> {
    fn drop(&mut self) {
        if self.armed {
            let mut state = self.inner.state();
            state.flushing = false;
            state.waiting.clear();
        }
    }
}

async fn run_flusher<F: Flush>(inner: Arc<Inner<F>>) {
    let mut guard = StopGuard {
        inner: &inner,
        armed: true,
    };
    loop {
        let batch: Vec<Waiting<F>> = {
            let mut state = inner.state();
            // A caller that stopped waiting has had its attempt recorded as failed; the
            // dispatcher tries it again, so its item need not go now.
            state.waiting.retain(|waiting| !waiting.reply.is_closed());
            let n = batch_len(
                state.waiting.iter().map(|waiting| F::size(&waiting.item)),
                inner.limits,
            );
            if n == 0 {
                state.flushing = false;
                guard.armed = false;
                return;
            }
            state.waiting.drain(..n).collect()
        };
        let (items, replies): (Vec<F::Item>, Vec<oneshot::Sender<F::Output>>) = batch
            .into_iter()
            .map(|waiting| (waiting.item, waiting.reply))
            .unzip();
        inner.n_flushes.fetch_add(1, Ordering::Relaxed);
        let outputs = inner.flush.flush(&items).await;
        // The items (task messages of up to tens of megabytes) are freed before the
        // callers resume.
        drop(items);
        debug_assert_eq!(outputs.len(), replies.len(), "one output per item");
        // A reply without an output (a flush that broke its contract) is dropped, which
        // its caller sees as `None`.
        for (reply, output) in replies.into_iter().zip(outputs) {
            let _ = reply.send(output);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::Semaphore;

    const LIMITS: BatchLimits = BatchLimits {
        max_items: 3,
        max_bytes: 100,
    };

    #[test]
    fn a_batch_takes_what_fits_and_a_large_first_item_goes_alone() {
        let check = |sizes: &[usize], expected: usize| {
            assert_eq!(
                batch_len(sizes.iter().copied(), LIMITS),
                expected,
                "{sizes:?}"
            );
        };
        check(&[], 0);
        check(&[1], 1);
        check(&[1, 1, 1, 1, 1], 3);
        check(&[40, 60, 1], 2);
        check(&[40, 61, 1], 1);
        check(&[500, 1], 1);
        check(&[1, 500], 1);
        check(&[usize::MAX, usize::MAX], 1);
    }

    /// Records every batch (its items) and answers `item * 10`; each flush waits for a
    /// permit, so a test decides when a flush in flight ends.
    struct Recorder {
        batches: Mutex<Vec<Vec<usize>>>,
        gate: Semaphore,
    }

    impl Flush for Recorder {
        type Item = usize;
        type Output = usize;
        fn size(item: &usize) -> usize {
            *item
        }
        fn flush<'a>(
            &'a self,
            items: &'a [usize],
        ) -> Pin<Box<dyn Future<Output = Vec<usize>> + Send + 'a>> {
            Box::pin(async move {
                self.batches.lock().unwrap().push(items.to_vec());
                self.gate.acquire().await.unwrap().forget();
                items.iter().map(|item| item * 10).collect()
            })
        }
    }

    fn batcher() -> Arc<Batcher<Recorder>> {
        Arc::new(Batcher::new(
            Recorder {
                batches: Mutex::new(Vec::new()),
                gate: Semaphore::new(0),
            },
            LIMITS,
        ))
    }

    fn batches(batcher: &Batcher<Recorder>) -> Vec<Vec<usize>> {
        batcher.flusher().batches.lock().unwrap().clone()
    }

    /// Lets the spawned tasks run until they all wait.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    fn submit(
        batcher: &Arc<Batcher<Recorder>>,
        item: usize,
    ) -> tokio::task::JoinHandle<Option<usize>> {
        let batcher = batcher.clone();
        tokio::spawn(async move { batcher.submit(item).await })
    }

    #[tokio::test]
    async fn a_lone_item_is_flushed_at_once_and_later_arrivals_form_bounded_batches_in_order() {
        let batcher = batcher();
        let first = submit(&batcher, 1);
        settle().await;
        assert_eq!(batches(&batcher), vec![vec![1]]);

        // While the first flush is in flight, six more arrive: the next batches take
        // them oldest first, at most three items and 100 bytes each: 96 goes alone.
        let later: Vec<_> = [2, 3, 4, 5, 96, 6]
            .into_iter()
            .map(|item| {
                let handle = submit(&batcher, item);
                (item, handle)
            })
            .collect();
        settle().await;
        batcher.flusher().gate.add_permits(100);
        assert_eq!(first.await.unwrap(), Some(10));
        for (item, handle) in later {
            assert_eq!(handle.await.unwrap(), Some(item * 10));
        }
        assert_eq!(
            batches(&batcher),
            vec![vec![1], vec![2, 3, 4], vec![5], vec![96], vec![6]]
        );
        assert_eq!(batcher.n_flushes(), 5);

        // Idle again: the next item starts a new flusher and goes at once.
        assert_eq!(batcher.submit(7).await, Some(70));
        assert_eq!(batches(&batcher).last(), Some(&vec![7]));
    }

    #[tokio::test]
    async fn a_caller_that_stops_waiting_neither_blocks_nor_breaks_the_batcher() {
        let batcher = batcher();
        // The first caller gives up while its flush is in flight, the second before its
        // flush started.
        let timed_out = tokio::time::timeout(Duration::from_millis(10), batcher.submit(1)).await;
        assert!(timed_out.is_err());
        let waiting = submit(&batcher, 2);
        settle().await;
        let gave_up = tokio::time::timeout(Duration::from_millis(10), batcher.submit(3)).await;
        assert!(gave_up.is_err());

        batcher.flusher().gate.add_permits(100);
        assert_eq!(waiting.await.unwrap(), Some(20));
        // Item 3 was skipped: nobody waited for it any more.
        assert_eq!(batches(&batcher), vec![vec![1], vec![2]]);
        assert_eq!(batcher.submit(4).await, Some(40));
        assert_eq!(batches(&batcher), vec![vec![1], vec![2], vec![4]]);
    }
}
