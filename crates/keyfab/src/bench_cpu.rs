//! Where a benchmark's CPU went: this process's threads grouped by name, and how busy the
//! machine's cores were, between two snapshots. Read from `/proc` (Linux); elsewhere the
//! figures are absent rather than wrong.

use std::collections::HashMap;

/// User + system CPU seconds of a process or thread, from its `/proc/…/stat` (Linux
/// counts in USER_HZ = 100 ticks per second); 0 if unreadable.
pub(crate) fn cpu_seconds(stat: &str) -> f64 {
    let Ok(text) = std::fs::read_to_string(stat) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (tick(11) + tick(12)) / 100.0
}

/// A moment's CPU counters.
pub(crate) struct Snapshot {
    /// Per thread id: its name and CPU seconds.
    threads: HashMap<String, (String, f64)>,
    /// The machine's (busy, total) jiffies over all cores.
    machine: Option<(f64, f64)>,
}

impl Snapshot {
    pub(crate) fn take() -> Self {
        let mut threads = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
            for task in dir.flatten() {
                let path = task.path();
                let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
                let cpu = cpu_seconds(&path.join("stat").to_string_lossy());
                threads.insert(
                    task.file_name().to_string_lossy().into_owned(),
                    (name.trim().to_owned(), cpu),
                );
            }
        }
        Self {
            threads,
            machine: machine_jiffies(),
        }
    }

    /// CPU seconds spent since `before`, per group that `group` puts each thread name in.
    pub(crate) fn since(&self, before: &Snapshot, group: impl Fn(&str) -> &'static str) -> Spent {
        let mut by_group: Vec<(&'static str, f64)> = Vec::new();
        for (tid, (name, cpu)) in &self.threads {
            let earlier = before.threads.get(tid).map_or(0.0, |(_, c)| *c);
            let g = group(name);
            match by_group.iter_mut().find(|(n, _)| *n == g) {
                Some((_, s)) => *s += cpu - earlier,
                None => by_group.push((g, cpu - earlier)),
            }
        }
        let busy = match (before.machine, self.machine) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => Some((b1 - b0) / (t1 - t0)),
            _ => None,
        };
        Spent { by_group, busy }
    }
}

/// What [`Snapshot::since`] found.
pub(crate) struct Spent {
    pub by_group: Vec<(&'static str, f64)>,
    /// The share of all cores' time that was busy (any process), 0–1.
    pub busy: Option<f64>,
}

impl Spent {
    /// Seconds of the group named `g`.
    pub(crate) fn of(&self, g: &str) -> f64 {
        self.by_group
            .iter()
            .find(|(n, _)| *n == g)
            .map_or(0.0, |(_, s)| *s)
    }
}

/// Busy and total jiffies of all cores (`/proc/stat`): idle and I/O wait are not busy.
fn machine_jiffies() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    Some((total - idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_is_counted_in_its_group() {
        let before = Snapshot::take();
        let spin = std::thread::Builder::new()
            .name("bench-cpu-spin".into())
            .spawn(|| {
                let t0 = std::time::Instant::now();
                let mut x = 0u64;
                while t0.elapsed() < std::time::Duration::from_millis(300) {
                    x = x.wrapping_mul(31).wrapping_add(1);
                }
                std::hint::black_box(x);
                // Still alive at the second snapshot.
                std::thread::sleep(std::time::Duration::from_millis(200));
            })
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(400));
        let after = Snapshot::take();
        let spent = after.since(&before, |n| {
            if n == "bench-cpu-spin" {
                "spin"
            } else {
                "other"
            }
        });
        spin.join().unwrap();
        if std::path::Path::new("/proc/self/task").exists() {
            assert!(spent.of("spin") >= 0.1, "{}", spent.of("spin"));
            assert!(spent.busy.is_some_and(|b| b > 0.0 && b <= 1.0));
        }
    }
}
