//! Injected randomness. Production uses the system generator; tests use `SeededRng` (with
//! the `harness` feature, or in this crate's own tests) so a run is reproducible. A
//! production build has no seeded generator to pick by mistake.

/// A source of cryptographically secure random bytes.
pub trait SecureRng: Send + Sync {
    /// Fills `out`. A failing system generator is unrecoverable, so this aborts the process
    /// rather than hand back predictable bytes.
    fn fill(&self, out: &mut [u8]);

    /// `N` random bytes.
    fn array<const N: usize>(&self) -> [u8; N]
    where
        Self: Sized,
    {
        let mut b = [0u8; N];
        self.fill(&mut b);
        b
    }
}

/// The operating system's generator, through aws-lc.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemRng;

impl SecureRng for SystemRng {
    fn fill(&self, out: &mut [u8]) {
        use aws_lc_rs::rand::SecureRandom;
        if aws_lc_rs::rand::SystemRandom::new().fill(out).is_err() {
            // No safe way to continue without randomness.
            std::process::abort();
        }
    }
}

/// Deterministic generator for tests: SHA-256(seed ‖ counter) blocks. Never use it for
/// real keys.
#[cfg(any(test, feature = "harness"))]
pub struct SeededRng {
    state: std::sync::Mutex<([u8; 32], u64)>,
}

#[cfg(any(test, feature = "harness"))]
impl SeededRng {
    /// The generator for `seed`: the same seed, the same bytes.
    pub fn new(seed: u64) -> Self {
        let mut s = [0u8; 32];
        s[..8].copy_from_slice(&seed.to_be_bytes());
        Self {
            state: std::sync::Mutex::new((s, 0)),
        }
    }
}

#[cfg(any(test, feature = "harness"))]
impl SecureRng for SeededRng {
    fn fill(&self, out: &mut [u8]) {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for chunk in out.chunks_mut(32) {
            let (seed, counter) = &mut *guard;
            let mut input = seed.to_vec();
            input.extend_from_slice(&counter.to_be_bytes());
            *counter += 1;
            let block = crate::hash::sha256(&input);
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_rng_is_reproducible_and_seed_dependent() {
        let a: [u8; 40] = SeededRng::new(7).array();
        let b: [u8; 40] = SeededRng::new(7).array();
        let c: [u8; 40] = SeededRng::new(8).array();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
