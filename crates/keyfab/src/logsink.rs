//! Where `site serve` writes its logs: standard error, from a thread of its own that
//! writes what has queued up in one go. A request's log line then costs its formatting,
//! not a system call on a serving thread (one `write` per line cost ~20 µs of the site's
//! CPU per device under load — more than TLS and HTTP around it).
//!
//! A failed write (standard error closed by a supervisor, say) is dropped: logging must
//! never stop the server. Lines still queued when the process is killed are lost (at
//! most [`GATHER`] of them); [`drain`] writes them out before a clean exit.

use std::io::Write;
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

/// After a write, how long the writer lets lines gather before the next one: under load
/// that is one write per few dozen lines, and a line waits at most this long.
const GATHER: Duration = Duration::from_millis(5);

/// Lines queued at most; a producer faster than standard error then waits, as it would
/// writing directly.
const MAX_QUEUED: usize = 65_536;

/// Bytes written at most in one `write`.
const MAX_WRITE: usize = 256 * 1024;

enum Message {
    Line(Vec<u8>),
    /// Answered once everything queued before it is written.
    Drain(mpsc::Sender<()>),
}

/// The writer thread's queue, once a line was written; `None` inside if the thread could
/// not start (lines are then written directly).
static QUEUE: OnceLock<Option<mpsc::SyncSender<Message>>> = OnceLock::new();

/// The writer thread's queue, started on first use.
fn queue() -> Option<&'static mpsc::SyncSender<Message>> {
    QUEUE
        .get_or_init(|| {
            let (tx, rx) = mpsc::sync_channel(MAX_QUEUED);
            std::thread::Builder::new()
                .name("keyfab-logs".into())
                .spawn(move || write_queued(&rx))
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

fn write_queued(rx: &mpsc::Receiver<Message>) {
    let mut buf = Vec::with_capacity(MAX_WRITE);
    let mut drained = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Message::Line(line) => buf.extend_from_slice(&line),
                Message::Drain(done) => drained.push(done),
            }
            if buf.len() < MAX_WRITE {
                next = rx.try_recv().ok();
            }
        }
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(&buf);
        let _ = err.flush();
        drop(err);
        buf.clear();
        if drained.is_empty() {
            std::thread::sleep(GATHER);
        }
        for done in drained.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Writes out every line queued so far (waiting a second at most). Nothing to do, and no
/// thread started, if no line was ever written.
pub(crate) fn drain() {
    let Some(Some(q)) = QUEUE.get() else { return };
    let (done, wait) = mpsc::channel();
    if q.send(Message::Drain(done)).is_ok() {
        let _ = wait.recv_timeout(Duration::from_secs(1));
    }
}

/// A writer of log lines: what is written goes to the queue as one piece when the
/// writer is flushed or dropped, so that the pieces of one line (`writeln!` writes
/// several) never interleave with another thread's.
#[derive(Default)]
pub(crate) struct LogSink {
    pending: Vec<u8>,
}

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let line = std::mem::take(&mut self.pending);
        match queue() {
            Some(q) => {
                if let Err(mpsc::SendError(Message::Line(line))) = q.send(Message::Line(line)) {
                    let _ = std::io::stderr().write_all(&line);
                }
            }
            None => {
                let _ = std::io::stderr().write_all(&line);
            }
        }
        Ok(())
    }
}

impl Drop for LogSink {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_of_a_line_are_sent_as_one() {
        let mut s = LogSink::default();
        write!(s, "a {}", 1).unwrap();
        writeln!(s, " b").unwrap();
        assert_eq!(s.pending, b"a 1 b\n");
        s.flush().unwrap();
        assert!(s.pending.is_empty());
        drain();
    }
}
