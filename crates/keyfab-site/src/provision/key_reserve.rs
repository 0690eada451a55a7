//! Site key pairs generated ahead, on cores that would otherwise sit idle.
//!
//! A `site` key needs nothing from its request, so it can exist before the request does.
//! Under load the engine's cores idle in short gaps (while the committer waits for its
//! `fdatasync`, between one batch's answers and the requests they free); a thread of the
//! lowest scheduling class (`SCHED_IDLE`) fills those gaps with key generation, and a
//! crypto worker takes a ready key instead of generating one. The thread never competes
//! with the request path for a core: the kernel runs it only when nothing else would run.
//! When the reserve is empty a worker generates its own key, as without a reserve.
//!
//! Keys are made of each type a worker has asked for (normally one: an entitlement's
//! `site` key type), up to [`CAPACITY`] of each, the type with the fewest ready first.
//!
//! Keys wait here briefly and only in memory. What is stored of a key is on the heap, so
//! taking a key moves a pointer and the secret is zeroized where it lies when dropped;
//! the rest of a key (its PKCS#8 form already on the heap, zeroized on drop; its public
//! parts) moves freely.

use keyfab_crypto::devicekey::{self, DeviceKeyType, Expanded};
use keyfab_crypto::secret::SecretBytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Keys held ready of each type: a few commits' worth of requests at the engine's usual
/// concurrency.
const CAPACITY: usize = 256;

/// The reserve thread, asleep on a full reserve, is woken once this many keys were taken
/// (a wake-up is a system call; one per key taken would cost the worker that takes it).
const WAKE_AFTER: usize = 32;

/// A generated key: what the site stores of it (`devicekey::generate_for_site`) and
/// everything computed from it.
pub(super) type ReadyKey = (SecretBytes, Expanded);

#[derive(Default)]
struct State {
    /// The types asked for, each with its ready keys.
    kinds: Vec<(DeviceKeyType, Vec<ReadyKey>)>,
    stopped: bool,
}

impl State {
    fn ready(&mut self, kind: DeviceKeyType) -> &mut Vec<ReadyKey> {
        let at = match self.kinds.iter().position(|(k, _)| *k == kind) {
            Some(at) => at,
            None => {
                self.kinds.push((kind, Vec::new()));
                self.kinds.len() - 1
            }
        };
        &mut self.kinds[at].1
    }

    /// The type with the fewest keys ready, if one is below capacity.
    fn wanted(&self) -> Option<DeviceKeyType> {
        self.kinds
            .iter()
            .filter(|(_, keys)| keys.len() < CAPACITY)
            .min_by_key(|(_, keys)| keys.len())
            .map(|(kind, _)| *kind)
    }
}

/// What the reserve thread and the workers share.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    refill: Condvar,
}

/// The reserve. Its thread starts with the first key asked for — a process that never
/// needs a `site` key (an entitlement of pool keys, a one-off `site provision` of one)
/// never makes one ahead — and [`KeyReserve::stop`] joins it.
///
/// Joined, not left to end by itself: the process must not exit while the thread is in
/// the crypto library. aws-lc tears its entropy sources down at exit, and a key begun
/// then aborts the whole process (seen: `SIGABRT` from `tree_jitter_drbg_derive_seed`
/// in this thread, after `site provision` had printed its result). The wait is at most
/// the key in progress, which the idle class still gets a small share of a core for.
#[derive(Default)]
pub(super) struct KeyReserve {
    shared: Arc<Shared>,
    started: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl KeyReserve {
    /// An empty reserve; its thread starts on the first [`KeyReserve::take`]. Without
    /// the thread (it could not be started, or not put in the idle class) the reserve
    /// stays empty and workers generate every key.
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Starts the thread once, unless the reserve is stopped. The handle's lock is held
    /// across the spawn, so a `stop` running meanwhile finds the handle and joins it.
    fn start_thread(&self) {
        // A load first: after the start, every take would otherwise write this line.
        if self.started.load(Ordering::Acquire) {
            return;
        }
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if self.started.swap(true, Ordering::AcqRel) || self.shared.lock().stopped {
            return;
        }
        let shared = self.shared.clone();
        *thread = std::thread::Builder::new()
            .name("keyfab-keygen".into())
            .spawn(move || shared.fill())
            .ok();
    }

    /// Stops the thread, drops (zeroizes) the keys it left, and waits for the thread to
    /// end.
    pub(super) fn stop(&self) {
        let mut state = self.shared.lock();
        state.stopped = true;
        state.kinds.clear();
        drop(state);
        self.shared.refill.notify_all();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    /// A key of `kind` generated ahead, if one is ready; from now on the thread makes
    /// keys of that type too. Never waits: the lock may be held by the reserve thread,
    /// which the kernel may leave off the cores for a long while on a busy machine (that
    /// is its class); a worker that finds the lock taken generates its own key.
    pub(super) fn take(&self, kind: DeviceKeyType) -> Option<ReadyKey> {
        self.start_thread();
        let mut state = match self.shared.state.try_lock() {
            Ok(state) => state,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        if state.stopped {
            return None;
        }
        let keys = state.ready(kind);
        let key = keys.pop();
        let left = keys.len();
        // A type asked for the first time, or one run down: the thread has work.
        if key.is_none() || left == CAPACITY - WAKE_AFTER {
            self.shared.refill.notify_one();
        }
        key
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fill(&self) {
        // Without the idle class the thread would take turns with the request path:
        // generating ahead then only moves work around, so the reserve stays empty.
        if !run_only_when_idle() {
            return;
        }
        loop {
            let kind = {
                let mut state = self.lock();
                loop {
                    if state.stopped {
                        return;
                    }
                    if let Some(kind) = state.wanted() {
                        break kind;
                    }
                    state = self.refill.wait(state).unwrap_or_else(|p| p.into_inner());
                }
            };
            let Some(key) = generate(kind) else { return };
            // Key generation left copies of the key in the frames below this one.
            keyfab_crypto::secret::scrub_stack();
            let mut state = self.lock();
            if state.stopped {
                return;
            }
            state.ready(kind).push(key);
            drop(state);
            // Yield after every key. A thread that wakes on this core should take it
            // from an idle-class thread at once, but does not always: the committer,
            // woken while this thread ran, was seen waiting up to 4 ms, with an idle
            // core beside it — a stall of every request in flight. Yielding bounds that
            // wait to one key's generation (`bench provision`, concurrency 64: waits
            // over 1 ms from 19–28 to 1–3 per 3 s; BENCHMARKS.md).
            std::thread::yield_now();
        }
    }
}

/// One key of `kind` (its frame is scrubbed by the caller).
#[inline(never)]
fn generate(kind: DeviceKeyType) -> Option<ReadyKey> {
    devicekey::generate_for_site(kind, &keyfab_crypto::rng::SystemRng).ok()
}

/// Puts the calling thread in the idle scheduling class; false where that fails.
fn run_only_when_idle() -> bool {
    use thread_priority::unix::{
        set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
        ThreadSchedulePolicy,
    };
    set_thread_priority_and_policy(
        thread_native_id(),
        thread_priority::ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfab_crypto::x509::DevicePublicKey;

    const P256: DeviceKeyType = DeviceKeyType::EcP256;

    fn ready(reserve: &KeyReserve, kind: DeviceKeyType) -> usize {
        reserve.shared.lock().ready(kind).len()
    }

    /// Waits (bounded) until the reserve thread has made `n` keys.
    fn wait_for(reserve: &KeyReserve, n: usize) -> bool {
        for _ in 0..2_000 {
            if ready(reserve, P256) >= n {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        false
    }

    /// A key, once the reserve thread lets go of the lock (`take` never waits for it).
    fn take_ready(reserve: &KeyReserve) -> Option<ReadyKey> {
        (0..1_000).find_map(|_| {
            let key = reserve.take(P256);
            if key.is_none() {
                std::thread::yield_now();
            }
            key
        })
    }

    /// A reserve whose thread has been started (by a first, empty-handed take).
    fn started() -> Arc<KeyReserve> {
        let reserve = KeyReserve::new();
        assert!(!reserve.started.load(Ordering::Acquire));
        assert!(reserve.take(P256).is_none());
        reserve
    }

    #[test]
    fn an_empty_reserve_hands_out_nothing_and_makes_nothing_until_asked() {
        let reserve = KeyReserve::new();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(reserve.thread.lock().unwrap().is_none(), "started unasked");
        assert!(reserve.take(P256).is_none());
        assert!(
            reserve.thread.lock().unwrap().is_some(),
            "not started by a take"
        );
        reserve.stop();
        // Stopped before any take: a late take starts nothing.
        let reserve = KeyReserve::new();
        reserve.stop();
        assert!(reserve.take(P256).is_none());
        assert!(
            reserve.thread.lock().unwrap().is_none(),
            "started after its stop"
        );
    }

    #[test]
    fn stop_returns_once_the_thread_has_ended() {
        let reserve = started();
        assert!(wait_for(&reserve, 1));
        assert_eq!(
            Arc::strong_count(&reserve.shared),
            2,
            "the thread holds one"
        );
        reserve.stop();
        // The thread's hold on the shared state went with it.
        assert_eq!(Arc::strong_count(&reserve.shared), 1);
    }

    #[test]
    fn the_thread_fills_the_reserve_with_distinct_working_keys_up_to_its_capacity() {
        let reserve = started();
        assert!(wait_for(&reserve, CAPACITY), "the reserve did not fill");
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(ready(&reserve, P256), CAPACITY, "filled past its capacity");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..CAPACITY {
            let (secret, expanded) = take_ready(&reserve).expect("a ready key");
            // The scalar and the rest of the key belong together: expanding the scalar
            // again gives the same public key.
            let again = devicekey::expand_stored(P256, secret.expose()).expect("expands");
            let (Some(DevicePublicKey::P256(a)), Some(DevicePublicKey::P256(b))) =
                (&expanded.public, &again.public)
            else {
                panic!("not a P-256 key");
            };
            assert_eq!(a, b);
            assert!(seen.insert(a.clone()), "a key was handed out twice");
        }
        reserve.stop();
    }

    #[test]
    fn taking_keys_wakes_the_thread_to_make_more() {
        let reserve = started();
        assert!(wait_for(&reserve, CAPACITY));
        for _ in 0..WAKE_AFTER {
            assert!(take_ready(&reserve).is_some());
        }
        assert!(wait_for(&reserve, CAPACITY), "the reserve was not refilled");
        reserve.stop();
    }

    #[test]
    fn a_stopped_reserve_drops_its_keys_and_hands_out_none() {
        let reserve = started();
        assert!(wait_for(&reserve, 1));
        reserve.stop();
        assert!(reserve.take(P256).is_none());
        assert!(reserve.shared.lock().kinds.is_empty());
    }

    #[test]
    fn each_type_asked_for_is_made_ahead_and_handed_out_as_that_type() {
        let reserve = started();
        assert!(reserve.take(DeviceKeyType::EcP384).is_none());
        for _ in 0..2_000 {
            if ready(&reserve, DeviceKeyType::EcP384) >= 4 && ready(&reserve, P256) >= 4 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let key = (0..1_000)
            .find_map(|_| reserve.take(DeviceKeyType::EcP384))
            .expect("a P-384 key");
        let again =
            devicekey::expand_stored(DeviceKeyType::EcP384, key.0.expose()).expect("expands");
        assert!(matches!(again.public, Some(DevicePublicKey::P384(_))));
        assert_eq!(again.key_id, key.1.key_id);
        reserve.stop();
    }
}
