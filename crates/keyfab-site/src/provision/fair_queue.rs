//! The crypto workers' queue, fair between stations: one queue per station, served in
//! turn. With one first-come queue, a station that keeps 64 requests waiting puts every
//! other station's request behind all 64 of them; served in turn, another station's
//! request waits behind at most one request of each station that has work waiting.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex};

/// Items queued per key (a station's name), taken one key at a time in turn.
pub(super) struct FairQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

struct State<T> {
    queues: HashMap<String, VecDeque<T>>,
    /// Keys with items waiting, in the order they are served next.
    turn: VecDeque<String>,
    closed: bool,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                queues: HashMap::new(),
                turn: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
        }
    }
}

impl<T> FairQueue<T> {
    /// Queues `item` behind `key`'s earlier ones; gives it back once the queue is closed.
    pub(super) fn push(&self, key: &str, item: T) -> Result<(), T> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.closed {
            return Err(item);
        }
        let queue = state.queues.entry(key.to_owned()).or_default();
        queue.push_back(item);
        if queue.len() == 1 {
            state.turn.push_back(key.to_owned());
        }
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// The next item of the key whose turn it is, waiting for one; `None` once the queue
    /// is closed and empty.
    pub(super) fn pop(&self) -> Option<T> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(key) = state.turn.pop_front() {
                let Some(queue) = state.queues.get_mut(&key) else {
                    continue;
                };
                let item = queue.pop_front();
                if queue.is_empty() {
                    state.queues.remove(&key);
                } else {
                    state.turn.push_back(key);
                }
                if item.is_some() {
                    return item;
                }
                continue;
            }
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Refuses new items; waiting takers get the ones left, then `None`.
    pub(super) fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stations_are_served_in_turn_whatever_one_of_them_queued() {
        let q = FairQueue::default();
        for i in 0..64 {
            q.push("flood", ("flood", i)).unwrap();
        }
        q.push("line-1", ("line-1", 0)).unwrap();
        q.push("line-2", ("line-2", 0)).unwrap();
        q.push("line-1", ("line-1", 1)).unwrap();
        let order: Vec<_> = (0..6).map(|_| q.pop().unwrap()).collect();
        assert_eq!(
            order,
            [
                ("flood", 0),
                ("line-1", 0),
                ("line-2", 0),
                ("flood", 1),
                ("line-1", 1),
                ("flood", 2)
            ]
        );
        // Each station's own items stay in order; closing hands out what is left.
        q.close();
        assert!(q.push("late", ("late", 0)).is_err());
        let rest: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(rest.len(), 61);
        assert!(rest.iter().zip(3..).all(|(item, i)| *item == ("flood", i)));
    }

    #[test]
    fn a_waiting_taker_wakes_for_an_item_and_for_the_close() {
        let q = std::sync::Arc::new(FairQueue::default());
        let taker = {
            let q = q.clone();
            std::thread::spawn(move || (q.pop(), q.pop()))
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        q.push("a", 7).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        q.close();
        assert_eq!(taker.join().unwrap(), (Some(7), None));
    }
}
