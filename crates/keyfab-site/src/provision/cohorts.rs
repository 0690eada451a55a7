//! Which requests the next batch waits for.
//!
//! With requests in flight from many callers, a commit's answers free its callers, whose
//! next requests go through the crypto workers while the following commit is written:
//! the requests take turns in two halves. A committer that starts its next batch the
//! moment a commit ends takes only the part of the other half that has left the crypto
//! workers by then, so commits come more often and carry fewer decisions, and each
//! decision pays a larger share of a commit's fixed cost (on two cores, ~20 µs of
//! committer CPU per device at 23 per commit against ~13 at 46).
//!
//! So each request is counted, until it leaves the crypto workers, in the cohort of the
//! commit during which it arrived. Before its next batch the committer waits — at most
//! [`MAX_WAIT`] — for the cohort of the commit just written: the requests that were
//! already on their way. It never waits for the requests its own answers freed, which
//! use the cores meanwhile; a cohort of none (a quiet line, one request at a time) costs
//! no wait at all.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The longest a batch waits for its cohort: a bound on the latency this adds. Longer
/// waits idled the cores while a cohort's last requests were still being prepared
/// (measured at concurrency 64 on two cores: no wait 34.8k devices/s, 100 µs 36.6k,
/// 200 µs 35.4k, 500 µs 32.2k; BENCHMARKS.md).
pub(super) const MAX_WAIT: Duration = Duration::from_micros(100);

#[derive(Default)]
pub(super) struct Cohorts {
    /// Commits whose answers were handed out.
    commits: AtomicU64,
    /// Requests in the crypto workers, by the parity of the commit they arrived during.
    in_crypto: [AtomicUsize; 2],
    /// The cohort the committer is parked for, plus one (0: not parked).
    awaited: AtomicUsize,
    committer: OnceLock<std::thread::Thread>,
}

impl Cohorts {
    /// A request enters the crypto workers; returns its cohort, for [`Cohorts::left`].
    pub(super) fn entered(&self) -> u64 {
        let cohort = self.commits.load(Ordering::SeqCst);
        self.in_crypto[parity(cohort)].fetch_add(1, Ordering::SeqCst);
        cohort
    }

    /// A request of `cohort` left the crypto workers (handed to the committer, or
    /// answered with an error).
    pub(super) fn left(&self, cohort: u64) {
        let p = parity(cohort);
        if self.in_crypto[p].fetch_sub(1, Ordering::SeqCst) == 1
            && self
                .awaited
                .compare_exchange(p + 1, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            if let Some(committer) = self.committer.get() {
                committer.unpark();
            }
        }
    }

    /// Called on the committer's thread, once, before it waits.
    pub(super) fn register_committer(&self) {
        let _ = self.committer.set(std::thread::current());
    }

    /// A commit is written and its answers are about to leave: requests from now on
    /// belong to the next cohort.
    pub(super) fn committed(&self) {
        self.commits.fetch_add(1, Ordering::SeqCst);
    }

    /// Waits until the requests that arrived during the last commit have left the
    /// crypto workers, or `max_wait` ([`MAX_WAIT`] in the committer).
    pub(super) fn await_last_cohort(&self, max_wait: Duration) {
        let Some(last) = self.commits.load(Ordering::SeqCst).checked_sub(1) else {
            return;
        };
        let p = parity(last);
        let deadline = Instant::now() + max_wait;
        loop {
            if self.in_crypto[p].load(Ordering::SeqCst) == 0 {
                return;
            }
            self.awaited.store(p + 1, Ordering::SeqCst);
            // Re-checked after saying what we wait for: a request that left in between
            // did not see it.
            if self.in_crypto[p].load(Ordering::SeqCst) == 0 {
                self.awaited.store(0, Ordering::SeqCst);
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                self.awaited.store(0, Ordering::SeqCst);
                return;
            }
            std::thread::park_timeout(deadline - now);
        }
    }
}

fn parity(cohort: u64) -> usize {
    usize::from(cohort % 2 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const LONG: Duration = Duration::from_secs(20);

    #[test]
    fn before_the_first_commit_and_with_an_empty_cohort_nothing_waits() {
        let cohorts = Cohorts::default();
        cohorts.register_committer();
        let started = Instant::now();
        cohorts.await_last_cohort(LONG);
        cohorts.committed();
        cohorts.await_last_cohort(LONG);
        assert!(started.elapsed() < LONG / 2);
    }

    #[test]
    fn the_batch_waits_for_the_requests_that_arrived_during_the_last_commit() {
        let cohorts = Arc::new(Cohorts::default());
        cohorts.register_committer();
        let on_their_way = [cohorts.entered(), cohorts.entered()];
        cohorts.committed();
        // Freed by the commit's answers: not waited for.
        let freed = cohorts.entered();
        assert_ne!(freed, on_their_way[0]);
        let leaving = cohorts.clone();
        let worker = std::thread::spawn(move || {
            for cohort in on_their_way {
                std::thread::sleep(Duration::from_millis(30));
                leaving.left(cohort);
            }
        });
        let started = Instant::now();
        cohorts.await_last_cohort(LONG);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(60), "{waited:?}");
        assert!(waited < LONG / 2, "{waited:?}");
        let _ = worker.join();
        cohorts.left(freed);
    }

    #[test]
    fn a_straggler_holds_the_batch_no_longer_than_the_bound() {
        let cohorts = Cohorts::default();
        cohorts.register_committer();
        let _stuck = cohorts.entered();
        cohorts.committed();
        let started = Instant::now();
        cohorts.await_last_cohort(Duration::from_millis(40));
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(40), "{waited:?}");
        assert!(waited < LONG / 2, "{waited:?}");
    }
}
