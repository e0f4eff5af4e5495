//! Wake-ups for long-polling workers.
//!
//! A new job wakes one waiting poll that wants its content type (and one poll that takes
//! any type), not every poll: waking all of them made each send a claim that all but one
//! lost, which cost a fifth of the throughput with idle workers (BENCHMARKS.md). A poll
//! that was woken and claimed a job passes one wake-up on along each of its queues, so a
//! wake-up it took for a type it did not end up claiming still reaches someone; the chain
//! stops at the first poll that finds nothing, which shows nothing of its types is left.
//! Events whose content type is unknown (retries becoming due, jobs created on another
//! replica) wake everyone.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use tokio::sync::Notify;

use crate::domain::ContentType;

/// Queues of content types nobody waits on are dropped once there are this many.
const MAX_IDLE_QUEUES: usize = 1024;

#[derive(Default)]
pub struct Wakeups {
    by_type: Mutex<HashMap<ContentType, Arc<Notify>>>,
    /// Polls without a type filter.
    any_type: Arc<Notify>,
    everyone: Notify,
}

impl Wakeups {
    /// A job of `content_type` became claimable.
    pub fn job_available(&self, content_type: &ContentType) {
        if let Some(queue) = self.by_type.lock().expect("wake-up lock").get(content_type) {
            queue.notify_one();
        }
        self.any_type.notify_one();
    }

    /// Something that may concern any poll happened.
    pub fn wake_everyone(&self) {
        self.everyone.notify_waiters();
    }

    /// The queues a poll for `content_types` (empty: any type) waits on.
    pub fn waiter(&self, content_types: &[ContentType]) -> Waiter<'_> {
        let queues = if content_types.is_empty() {
            vec![self.any_type.clone()]
        } else {
            let mut by_type = self.by_type.lock().expect("wake-up lock");
            if by_type.len() > MAX_IDLE_QUEUES {
                by_type.retain(|_, queue| Arc::strong_count(queue) > 1);
            }
            content_types
                .iter()
                .map(|t| by_type.entry(t.clone()).or_default().clone())
                .collect()
        };
        Waiter {
            wakeups: self,
            queues,
        }
    }
}

/// One long poll's place in the queues.
pub struct Waiter<'a> {
    wakeups: &'a Wakeups,
    queues: Vec<Arc<Notify>>,
}

/// Registered interest: created before a claim attempt, so a job committed between the
/// attempt and the wait still wakes the poll.
pub struct Registration<'a> {
    everyone: Pin<Box<tokio::sync::futures::Notified<'a>>>,
    targeted: Vec<Pin<Box<tokio::sync::futures::Notified<'a>>>>,
}

/// Why a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Woken {
    /// A job of one of the poll's types (this wake-up must be passed on after a claim).
    Targeted,
    Everyone,
}

impl<'a> Waiter<'a> {
    pub fn register(&'a self) -> Registration<'a> {
        let mut everyone = Box::pin(self.wakeups.everyone.notified());
        everyone.as_mut().enable();
        let targeted = self
            .queues
            .iter()
            .map(|queue| {
                let mut notified = Box::pin(queue.notified());
                notified.as_mut().enable();
                notified
            })
            .collect();
        Registration { everyone, targeted }
    }

    /// After a claim that followed a targeted wake-up: hand one wake-up on per queue.
    pub fn pass_on(&self) {
        for queue in &self.queues {
            queue.notify_one();
        }
    }
}

impl Registration<'_> {
    pub async fn woken(&mut self) -> Woken {
        std::future::poll_fn(|cx| {
            if self.everyone.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Woken::Everyone);
            }
            for notified in &mut self.targeted {
                if notified.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Woken::Targeted);
                }
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ct(name: &str) -> ContentType {
        ContentType::parse(name).unwrap()
    }

    async fn woken_within(registration: &mut Registration<'_>, ms: u64) -> Option<Woken> {
        tokio::time::timeout(Duration::from_millis(ms), registration.woken())
            .await
            .ok()
    }

    #[tokio::test]
    async fn a_job_wakes_one_poll_of_its_type_and_one_any_type_poll() {
        let wakeups = Wakeups::default();
        let (audio_a, audio_b) = (
            wakeups.waiter(&[ct("audio")]),
            wakeups.waiter(&[ct("audio")]),
        );
        let (video, any) = (wakeups.waiter(&[ct("video")]), wakeups.waiter(&[]));
        let (mut a, mut b, mut v, mut n) = (
            audio_a.register(),
            audio_b.register(),
            video.register(),
            any.register(),
        );
        wakeups.job_available(&ct("audio"));
        let first = woken_within(&mut a, 50).await;
        let second = woken_within(&mut b, 50).await;
        assert_eq!(
            [first, second]
                .iter()
                .filter(|w| **w == Some(Woken::Targeted))
                .count(),
            1,
            "exactly one audio poll"
        );
        assert_eq!(woken_within(&mut v, 20).await, None, "video polls sleep on");
        assert_eq!(woken_within(&mut n, 50).await, Some(Woken::Targeted));
    }

    #[tokio::test]
    async fn a_job_created_before_the_wait_starts_is_not_missed() {
        let wakeups = Wakeups::default();
        let waiter = wakeups.waiter(&[ct("web")]);
        let mut registration = waiter.register();
        // The job commits between the claim attempt and the wait.
        wakeups.job_available(&ct("web"));
        assert_eq!(
            woken_within(&mut registration, 50).await,
            Some(Woken::Targeted)
        );
    }

    #[tokio::test]
    async fn pass_on_reaches_the_next_poll_and_everyone_wakes_all() {
        let wakeups = Wakeups::default();
        let (first, second) = (
            wakeups.waiter(&[ct("audio"), ct("video")]),
            wakeups.waiter(&[ct("video")]),
        );
        let mut r2 = second.register();
        first.pass_on();
        assert_eq!(woken_within(&mut r2, 50).await, Some(Woken::Targeted));
        let mut r1 = first.register();
        let mut r2 = second.register();
        wakeups.wake_everyone();
        assert_eq!(woken_within(&mut r1, 50).await, Some(Woken::Everyone));
        assert_eq!(woken_within(&mut r2, 50).await, Some(Woken::Everyone));
    }

    #[test]
    fn idle_queues_do_not_pile_up() {
        let wakeups = Wakeups::default();
        for i in 0..3 * MAX_IDLE_QUEUES {
            drop(wakeups.waiter(&[ct(&format!("t{i}"))]));
        }
        assert!(wakeups.by_type.lock().unwrap().len() <= MAX_IDLE_QUEUES + 1);
    }
}
