//! The store file, with the space ahead of redb's writes filled with zeros in the
//! background.
//!
//! Why: redb grows its file by extending it (doubling it while it is small), which leaves
//! the new part a hole, and then writes its new pages into that hole. On ext4 — and any
//! file system that allocates blocks when they are first written — a commit whose pages
//! land in a hole allocates blocks, and its `fdatasync` then also has to write the file's
//! block map and inode: one more synchronous trip to the device in every commit. Measured
//! here: ~1.5 block allocations per provisioning commit, and commits ~12 % (p50) to 20 %
//! (p90) slower than the same writes into space already written (BENCHMARKS.md). So a
//! filler thread writes zeros a bounded distance ([`AHEAD`]) beyond the furthest byte
//! redb has written, and syncs them itself, outside any commit; redb's pages then land on
//! allocated blocks.
//!
//! What keeps redb's data safe: zeros are only ever written where redb has not written
//! since this process opened the file or grew it. Every redb write that reaches past the
//! filled mark, and every zero write, happens under one lock, and the ranges redb wrote
//! past the mark are remembered so the filler skips them. Writes wholly below the mark
//! (nearly all of them) take no lock. A file opened with holes (a site restarted after
//! redb had grown its file) starts with the mark at zero: every redb write is remembered
//! while the filler looks for where the file's all-zero tail begins; only that tail, less
//! what redb wrote meanwhile, is filled. Zeros written over bytes that read as zeros and
//! that redb has not written change nothing but the allocation.
//!
//! Durability is untouched: the zeros are in space redb holds free, and the filler's
//! `fdatasync` only makes some of redb's writes durable earlier than its own commit does.

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// What redb's storage backend trait returns for I/O (without its experimental API).
type BackendIoError = std::io::Error;
use std::fs::File;
use std::ops::{Bound, Range};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// How far beyond the furthest byte redb wrote the zeros reach: space allocated ahead
/// of need, at most this much.
const AHEAD: u64 = 32 << 20;

/// Zeros written per step, under the lock (redb's writes past the mark wait this long:
/// a copy into the page cache).
const CHUNK: u64 = 256 << 10;

/// The filler syncs after this much, so the blocks are allocated by its `fdatasync`, not
/// by the next commit's (a commit's `fdatasync` writes every dirty page of the file). In
/// small steps: a commit also waits for pages already on their way to the disk, and with
/// 4 MiB per sync the provisioning p99 went from 3.4–4.1 to 5.3–6.2 ms; with 256 KiB it
/// stayed where it was.
const SYNC_EVERY: u64 = 256 << 10;

/// redb's file backend with a filler thread beside it.
pub(crate) struct PrefilledFile {
    shared: Arc<Shared>,
    filler: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    file: FileBackend,
    /// `Fill::filled`, readable without the lock (writes below it need none).
    filled: AtomicU64,
    fill: Mutex<Fill>,
    wake: Condvar,
}

#[derive(Default)]
struct Fill {
    /// The file's length, as redb last set it.
    len: u64,
    /// Everything below is written (by redb, or with zeros, or was in the file at open).
    filled: u64,
    /// The furthest end of any redb write.
    furthest: u64,
    /// What redb wrote at or past `filled`: sorted, disjoint, never zeroed.
    written: Vec<Range<u64>>,
    /// Opened with holes: the start of the all-zero tail is not known yet, nothing is
    /// filled until it is.
    scanning: bool,
    /// The filler stopped on an I/O error: nothing more is filled or remembered.
    given_up: bool,
    closing: bool,
}

impl Fill {
    /// The next range to zero, if the filler is behind.
    fn next_step(&self) -> Option<Range<u64>> {
        if self.scanning {
            return None;
        }
        let goal = self.len.min(self.furthest.saturating_add(AHEAD));
        (self.filled < goal).then(|| self.filled..goal.min(self.filled + CHUNK))
    }

    /// Records a redb write of `range`, the part of it past `filled`.
    fn note_written(&mut self, range: Range<u64>) {
        self.furthest = self.furthest.max(range.end);
        let start = range.start.max(self.filled);
        if start >= range.end {
            return;
        }
        let at = self.written.partition_point(|r| r.end < start);
        let mut merged = start..range.end;
        while let Some(r) = self.written.get(at) {
            if r.start > merged.end {
                break;
            }
            merged = merged.start.min(r.start)..merged.end.max(r.end);
            self.written.remove(at);
        }
        self.written.insert(at, merged);
    }

    /// The parts of `step` redb has not written: where zeros go.
    fn gaps(&self, step: &Range<u64>) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut from = step.start;
        for r in &self.written {
            if r.end <= from {
                continue;
            }
            if r.start >= step.end {
                break;
            }
            if r.start > from {
                out.push(from..r.start);
            }
            from = from.max(r.end);
        }
        if from < step.end {
            out.push(from..step.end);
        }
        out
    }

    /// The search found the all-zero tail starting at `tail`: the mark moves there, and
    /// what redb wrote at or past it during the search stays remembered. Returns the mark.
    fn tail_found(&mut self, tail: u64) -> u64 {
        if self.given_up {
            return self.filled;
        }
        let start = tail.min(self.len);
        self.scanning = false;
        self.filled_through(start);
        self.furthest = self.furthest.max(start);
        start
    }

    /// `step` is filled: move the mark past it and forget what redb wrote below it.
    fn filled_through(&mut self, end: u64) {
        self.filled = end;
        self.written.retain(|r| r.end > end);
        if let Some(first) = self.written.first_mut() {
            first.start = first.start.max(end);
        }
    }
}

impl PrefilledFile {
    /// Wraps `file` (redb's own file backend takes its locks) and starts the filler.
    pub(crate) fn new(file: File) -> Result<Self, redb::DatabaseError> {
        let meta = file.metadata()?;
        let len = meta.len();
        // Fewer bytes allocated than the length: there are holes somewhere.
        let scanning = meta.blocks().saturating_mul(512) < len;
        let filled = if scanning { 0 } else { len };
        let shared = Arc::new(Shared {
            file: FileBackend::new(file)?,
            filled: AtomicU64::new(filled),
            fill: Mutex::new(Fill {
                len,
                filled,
                furthest: filled,
                scanning,
                ..Fill::default()
            }),
            wake: Condvar::new(),
        });
        let for_filler = shared.clone();
        let filler = std::thread::Builder::new()
            .name("keyfab-prefill".into())
            .spawn(move || for_filler.run())?;
        Ok(Self {
            shared,
            filler: Mutex::new(Some(filler)),
        })
    }

    fn stop(&self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_all();
        let handle = self.filler.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Fill> {
        // The state stays consistent at every unlock, so a panic elsewhere leaves it usable.
        self.fill.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The filler thread. On an I/O error it gives up: only speed is lost, redb writes
    /// where it would have anyway.
    fn run(&self) {
        if self.fill().is_err() {
            self.give_up();
        }
    }

    /// Stops filling for good: the mark moves past any length, so redb's writes take the
    /// path without the lock and nothing more is remembered.
    fn give_up(&self) {
        let mut fill = self.lock();
        fill.given_up = true;
        fill.scanning = false;
        fill.written.clear();
        fill.filled = u64::MAX;
        self.filled.store(u64::MAX, Ordering::Release);
    }

    fn fill(&self) -> std::io::Result<()> {
        let mut zeros = vec![0u8; CHUNK as usize];
        if self.lock().scanning {
            let Some(tail) = self.find_zero_tail(&mut zeros)? else {
                return Ok(());
            };
            let start = self.lock().tail_found(tail);
            self.filled.store(start, Ordering::Release);
        }
        let mut unsynced = 0u64;
        loop {
            let mut fill = self.lock();
            let step = loop {
                if fill.closing {
                    return Ok(());
                }
                if let Some(step) = fill.next_step() {
                    break step;
                }
                if unsynced > 0 {
                    break fill.filled..fill.filled;
                }
                fill = self.wake.wait(fill).unwrap_or_else(|p| p.into_inner());
            };
            if step.is_empty() {
                // Caught up: make what was filled allocated now, not in the next commit.
                drop(fill);
                unsynced = 0;
                self.file.sync_data()?;
                continue;
            }
            for gap in fill.gaps(&step) {
                let n = (gap.end - gap.start) as usize;
                self.file.write(gap.start, &zeros[..n])?;
            }
            fill.filled_through(step.end);
            self.filled.store(step.end, Ordering::Release);
            drop(fill);
            unsynced += step.end - step.start;
            if unsynced >= SYNC_EVERY {
                unsynced = 0;
                self.file.sync_data()?;
            }
        }
    }
}

impl Shared {
    /// Opened with holes: reads back from the end, a chunk at a time, to where the file
    /// stops being all zeros. Meanwhile every redb write is remembered (the mark is at
    /// zero), so one that lands in the tail is skipped by the filler even if the tail
    /// read as zeros before it. `buf` is left zeroed. `None` when closing.
    fn find_zero_tail(&self, buf: &mut [u8]) -> std::io::Result<Option<u64>> {
        let mut tail = self.lock().len;
        while tail > 0 {
            if self.lock().closing {
                return Ok(None);
            }
            // The chunk holding the byte before `tail`.
            let from = (tail - 1) / CHUNK * CHUNK;
            let n = (tail - from) as usize;
            self.file.read(from, &mut buf[..n])?;
            let all_zero = buf[..n].iter().all(|b| *b == 0);
            buf[..n].fill(0);
            if !all_zero {
                break;
            }
            tail = from;
        }
        Ok(Some(tail))
    }
}

impl Drop for PrefilledFile {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for PrefilledFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fill = self.shared.lock();
        f.debug_struct("PrefilledFile")
            .field("len", &fill.len)
            .field("filled", &fill.filled)
            .finish()
    }
}

impl StorageBackend for PrefilledFile {
    fn len(&self) -> Result<u64, BackendIoError> {
        self.shared.file.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendIoError> {
        self.shared.file.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), BackendIoError> {
        let mut fill = self.shared.lock();
        self.shared.file.set_len(len)?;
        if fill.given_up {
            return Ok(());
        }
        if len < fill.filled {
            fill.filled_through(len);
            fill.written.clear();
            self.shared.filled.store(len, Ordering::Release);
        }
        fill.written.retain(|r| r.start < len);
        if let Some(last) = fill.written.last_mut() {
            last.end = last.end.min(len);
        }
        fill.furthest = fill.furthest.min(len);
        fill.len = len;
        drop(fill);
        self.shared.wake.notify_all();
        Ok(())
    }

    fn sync_data(&self) -> Result<(), BackendIoError> {
        self.shared.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendIoError> {
        let end = offset + data.len() as u64;
        if end <= self.shared.filled.load(Ordering::Acquire) {
            return self.shared.file.write(offset, data);
        }
        // Past the mark: under the lock, so no zeros can land on it, and remembered.
        let mut fill = self.shared.lock();
        self.shared.file.write(offset, data)?;
        fill.note_written(offset..end);
        drop(fill);
        self.shared.wake.notify_all();
        Ok(())
    }

    fn close(&self) -> Result<(), BackendIoError> {
        self.stop();
        self.shared.file.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.shared.file.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.shared.file.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.shared.file.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.shared.file.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.shared.file.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.shared.file.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Waits (a while at most) for the filler to have filled up to `end`.
    fn wait_filled(backend: &PrefilledFile, end: u64) {
        let started = std::time::Instant::now();
        while backend.shared.filled.load(Ordering::Acquire) < end
            && started.elapsed() < std::time::Duration::from_secs(20)
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn writes_past_the_mark_are_remembered_merged_and_skipped() {
        let mut fill = Fill {
            len: 100,
            filled: 10,
            furthest: 10,
            ..Fill::default()
        };
        fill.note_written(0..5); // below the mark: nothing to remember
        fill.note_written(30..40);
        fill.note_written(50..60);
        fill.note_written(38..52); // joins both
        fill.note_written(8..12); // straddles the mark
        assert_eq!(fill.written, vec![10..12, 30..60]);
        assert_eq!(fill.furthest, 60);
        assert_eq!(fill.gaps(&(10..70)), vec![12..30, 60..70]);
        assert_eq!(fill.gaps(&(31..59)), Vec::<Range<u64>>::new());
        fill.filled_through(35);
        assert_eq!(fill.written, vec![35..60]);
        assert_eq!(fill.next_step(), Some(35..100));
    }

    /// While the tail is searched for, the mark is at zero, so every write is remembered;
    /// those in the tail stay out of the zeros once it is found.
    #[test]
    fn writes_during_the_search_are_kept_out_of_the_zeros() {
        let mut fill = Fill {
            len: 100,
            scanning: true,
            ..Fill::default()
        };
        assert_eq!(fill.next_step(), None);
        fill.note_written(10..20);
        fill.note_written(60..70);
        assert_eq!(fill.tail_found(50), 50);
        assert_eq!(fill.written, vec![60..70]);
        let step = fill.next_step().unwrap();
        assert_eq!(step, 50..100);
        assert_eq!(fill.gaps(&step), vec![50..60, 70..100]);
    }

    #[test]
    fn the_filler_stays_a_bounded_distance_ahead() {
        let fill = Fill {
            len: 10 * AHEAD,
            filled: 0,
            furthest: 0,
            ..Fill::default()
        };
        assert_eq!(fill.next_step(), Some(0..CHUNK));
        let caught_up = Fill {
            filled: AHEAD,
            ..fill
        };
        assert_eq!(caught_up.next_step(), None);
    }

    /// redb's writes past the mark, racing the filler, are never overwritten by zeros;
    /// the rest of the grown space ends up written (allocated), not a hole.
    #[test]
    fn zeros_never_land_on_written_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let backend = PrefilledFile::new(file).unwrap();
        let len = 24 << 20;
        backend.set_len(len).unwrap();
        // Pages written all over the grown space while the filler runs.
        let mut expected = vec![0u8; len as usize];
        let mut x = 0x9e37_79b9_u64;
        for i in 0..3000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let page = x % (len / 4096);
            let data = [(i % 251) as u8 + 1; 4096];
            backend.write(page * 4096, &data).unwrap();
            expected[(page * 4096) as usize..][..4096].copy_from_slice(&data);
        }
        wait_filled(&backend, len);
        backend.close().unwrap();
        drop(backend);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len(), expected.len());
        assert!(on_disk == expected, "a write was lost under the zeros");
        // The filler reached the end (every write went within AHEAD of the last byte).
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            allocated >= len,
            "only {allocated} of {len} bytes allocated"
        );
    }

    /// A file with data at 0 and at 3 MiB + 4 KiB, and a hole up to 12 MiB: what a
    /// site restarted after redb grew its file finds.
    fn file_with_hole_tail(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
        use std::os::unix::fs::FileExt;
        let path = dir.join("f");
        let len = 12usize << 20;
        let f = std::fs::File::create(&path).unwrap();
        f.write_all_at(&[5; 8192], 0).unwrap();
        f.write_all_at(&[6; 4096], (3 << 20) + 4096).unwrap();
        f.set_len(len as u64).unwrap();
        f.sync_all().unwrap();
        let mut expected = vec![0u8; len];
        expected[..8192].fill(5);
        expected[(3 << 20) + 4096..][..4096].fill(6);
        (path, expected)
    }

    fn open_rw(path: &std::path::Path) -> PrefilledFile {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        PrefilledFile::new(file).unwrap()
    }

    /// The all-zero tail is found at open and filled; what lies before it is untouched.
    #[test]
    fn a_hole_tail_found_at_open_is_filled() {
        let dir = tempfile::tempdir().unwrap();
        let (path, expected) = file_with_hole_tail(dir.path());
        let len = expected.len() as u64;
        let backend = open_rw(&path);
        wait_filled(&backend, len);
        backend.close().unwrap();
        drop(backend);
        assert!(std::fs::read(&path).unwrap() == expected, "data changed");
        // From the chunk after the last data (4 MiB) to the end: allocated now.
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            allocated >= len - (4 << 20),
            "only {allocated} bytes allocated"
        );
    }

    /// Writes into the tail while it is being looked for are never zeroed.
    #[test]
    fn writes_during_the_search_for_the_tail_survive() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut expected) = file_with_hole_tail(dir.path());
        let len = expected.len() as u64;
        let backend = open_rw(&path);
        for (i, page) in [2816u64, 1280, 2000, 1100, 3070].into_iter().enumerate() {
            let data = [10 + i as u8; 4096];
            backend.write(page * 4096, &data).unwrap();
            expected[(page * 4096) as usize..][..4096].copy_from_slice(&data);
        }
        wait_filled(&backend, len);
        backend.close().unwrap();
        drop(backend);
        assert!(
            std::fs::read(&path).unwrap() == expected,
            "a write was lost"
        );
    }

    /// After an I/O error the filler gives up: redb's writes keep working, and nothing is
    /// remembered any more (the list would otherwise grow for the life of the process).
    #[test]
    fn a_filler_that_gave_up_remembers_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut expected) = file_with_hole_tail(dir.path());
        let backend = open_rw(&path);
        backend.shared.give_up();
        backend.write(8 << 20, &[3; 4096]).unwrap();
        expected[8 << 20..][..4096].fill(3);
        backend.set_len(16 << 20).unwrap();
        backend.write(14 << 20, &[4; 4096]).unwrap();
        expected.resize(16 << 20, 0);
        expected[14 << 20..][..4096].fill(4);
        {
            let fill = backend.shared.lock();
            assert!(fill.written.is_empty());
            assert_eq!(fill.next_step(), None);
        }
        backend.close().unwrap();
        drop(backend);
        assert!(std::fs::read(&path).unwrap() == expected);
    }

    #[test]
    fn a_shrunk_and_regrown_file_is_filled_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        drop(file);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let backend = PrefilledFile::new(file).unwrap();
        backend.set_len(4 << 20).unwrap();
        backend.write(0, &[7; 4096]).unwrap();
        backend.set_len(8192).unwrap();
        backend.set_len(4 << 20).unwrap();
        backend.write((2 << 20) + 4096, &[9; 4096]).unwrap();
        wait_filled(&backend, 4 << 20);
        backend.close().unwrap();
        drop(backend);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[..4096], &[7; 4096]);
        assert!(on_disk[4096..(2 << 20) + 4096].iter().all(|b| *b == 0));
        assert_eq!(&on_disk[(2 << 20) + 4096..][..4096], &[9; 4096]);
        assert!(on_disk[(2 << 20) + 8192..].iter().all(|b| *b == 0));
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(allocated >= 4 << 20, "only {allocated} bytes allocated");
    }
}
