//! Per-station bounds, so that one runaway station cannot starve the others: at most so
//! many open connections and so many requests in flight per station. Past its bound a
//! station's new connection is closed after the handshake and its new request is
//! answered `429 busy` at once — the other stations keep their share of the server and
//! of the committer's queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bounds per station.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Connections at once.
    pub connections: usize,
    /// Requests in flight at once.
    pub requests: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            connections: 64,
            requests: 16,
        }
    }
}

/// Per-station bounds, so one station cannot starve the others.
#[derive(Default)]
pub struct StationLimits {
    bounds: Bounds,
    per_station: Mutex<HashMap<String, Slots>>,
}

#[derive(Clone)]
struct Slots {
    connections: Arc<Semaphore>,
    requests: Arc<Semaphore>,
}

/// Held while a connection (or a request) of a station is open; frees its slot on drop.
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

impl StationLimits {
    /// Limits of `bounds` per station.
    pub fn new(bounds: Bounds) -> Self {
        Self {
            bounds,
            per_station: Mutex::default(),
        }
    }

    fn slots(&self, station: &str) -> Slots {
        let mut map = self.per_station.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(station.to_owned())
            .or_insert_with(|| Slots {
                connections: Arc::new(Semaphore::new(self.bounds.connections.max(1))),
                requests: Arc::new(Semaphore::new(self.bounds.requests.max(1))),
            })
            .clone()
    }

    /// A connection slot for `station`, or `None` if it has its bound open already.
    pub fn connection(&self, station: &str) -> Option<Slot> {
        self.slots(station)
            .connections
            .try_acquire_owned()
            .ok()
            .map(Slot)
    }

    /// Each station's connections open now (stations with none left out).
    pub fn open_connections(&self) -> std::collections::BTreeMap<String, usize> {
        let map = self.per_station.lock().unwrap_or_else(|p| p.into_inner());
        let bound = self.bounds.connections.max(1);
        map.iter()
            .map(|(name, slots)| {
                let open = bound.saturating_sub(slots.connections.available_permits());
                (name.clone(), open)
            })
            .filter(|(_, open)| *open > 0)
            .collect()
    }

    /// A request slot for `station`, or `None` if it has its bound in flight already.
    pub fn request(&self, station: &str) -> Option<Slot> {
        self.slots(station)
            .requests
            .try_acquire_owned()
            .ok()
            .map(Slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_station_is_bounded_alone() {
        let limits = StationLimits::new(Bounds {
            connections: 1,
            requests: 2,
        });
        let a1 = limits.request("a").unwrap();
        let _a2 = limits.request("a").unwrap();
        assert!(limits.request("a").is_none());
        assert!(limits.request("b").is_some());
        drop(a1);
        assert!(limits.request("a").is_some());
        let _c = limits.connection("a").unwrap();
        assert!(limits.connection("a").is_none());
        assert_eq!(limits.open_connections().get("a"), Some(&1));
        assert!(limits.connection("b").is_some());
    }
}
