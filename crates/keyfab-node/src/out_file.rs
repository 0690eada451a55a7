//! Files a command writes for the operator to carry elsewhere (a receipt, a bundle, a
//! reset): checked before anything is changed, and on disk whole or not at all.
//!
//! A command first calls [`check_new`] — so a path it cannot write fails before it
//! records, consumes or signs anything — then does its work, then [`write_new`]: a
//! temporary file beside the target, synced, renamed into place, and the directory
//! synced, so a crash leaves either the whole file or none.

use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The directory `out` will be written in.
fn dir_of(out: &Path) -> &Path {
    match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Refuses an `--out` that cannot take a new file: a directory, a path that exists (a
/// file, or a symlink to anything), a directory that does not exist. `nothing_done` ends
/// each message ("nothing was exported").
pub fn check_new(out: &Path, nothing_done: &str) -> Result<()> {
    let shown = out.display();
    if out.is_dir() {
        return Err(Error::InvalidInput(format!(
            "--out {shown} is a directory: name the file to write; {nothing_done}"
        )));
    }
    if out.symlink_metadata().is_ok() {
        return Err(Error::InvalidInput(format!(
            "--out {shown} exists and is not overwritten; {nothing_done}"
        )));
    }
    let dir = dir_of(out);
    if !dir.is_dir() {
        return Err(Error::InvalidInput(format!(
            "--out {shown}: the directory {} does not exist; {nothing_done}",
            dir.display()
        )));
    }
    Ok(())
}

/// The temporary file `out` is written to first: hidden, beside it, one name per target,
/// so two writers of one file cannot both proceed. Its writer holds a lock on it while
/// it writes; a temporary file nobody holds was left by a writer that stopped (killed,
/// or its machine went down) and is taken over by the next one.
fn temp_of(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    dir_of(out).join(format!(".{name}.tmp"))
}

/// Creates the temporary file `tmp` for `out`, locked by this process. One left by a
/// writer that stopped is removed first; one a running writer holds is refused.
fn create_temp(tmp: &Path, out: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    // Private from the start: some outputs hold key material (a device's keys).
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)
    };
    let f = match create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let left = std::fs::OpenOptions::new().write(true).open(tmp)?;
            if let Err(std::fs::TryLockError::WouldBlock) = left.try_lock() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!(
                        "another keyfab is writing {} (through {}): wait for it to finish",
                        out.display(),
                        tmp.display()
                    ),
                ));
            }
            // Nobody holds it: its writer stopped. Removed only if the name still
            // leads to the file locked here, never to another writer's new one.
            let (held, now) = (left.metadata()?, std::fs::symlink_metadata(tmp)?);
            if (held.dev(), held.ino()) == (now.dev(), now.ino()) {
                std::fs::remove_file(tmp)?;
            }
            drop(left);
            create()?
        }
        other => other?,
    };
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("another keyfab is writing {}", out.display()),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Writes `bytes` to the new file `out` durably: whole or not at all, never over a file
/// that appeared meanwhile.
pub fn write_new(out: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_new_with(out, |f| f.write_all(bytes))
}

/// Writes the new file `out` through `write`, which gets a temporary file beside it;
/// then syncs it, renames it into place unless a file appeared at `out` meanwhile, and
/// syncs the directory. A crash or any error leaves either the whole file or none (the
/// temporary file is removed on error).
pub fn write_new_with<T, E: From<std::io::Error>>(
    out: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    let tmp = temp_of(out);
    // Only a temporary file this call created is removed on error, never another
    // writer's.
    let created = std::cell::Cell::new(false);
    let written = (|| {
        let mut f = create_temp(&tmp, out)?;
        created.set(true);
        let value = write(&mut f)?;
        f.sync_all()?;
        if out.symlink_metadata().is_ok() {
            return Err(E::from(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the file appeared while it was being written",
            )));
        }
        std::fs::rename(&tmp, out)?;
        std::fs::File::open(dir_of(out))?.sync_all()?;
        Ok(value)
    })();
    if written.is_err() && created.get() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// An anonymous temporary file in `out`'s directory, gone when dropped: where a large
/// file's body is kept while its signed header is made (`keyfab_formats::Spool`).
pub fn spool_beside(out: &Path) -> std::io::Result<std::fs::File> {
    tempfile::tempfile_in(dir_of(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_file_is_written_whole_and_nothing_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.kfk");
        check_new(&out, "nothing was done").unwrap();
        write_new(&out, b"bytes").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"bytes");
        // Only the file: no temporary left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let again = check_new(&out, "nothing was done").unwrap_err();
        assert!(again.to_string().contains("exists"), "{again}");
        assert!(write_new(&out, b"other").is_err());
        assert_eq!(std::fs::read(&out).unwrap(), b"bytes");
        assert!(check_new(dir.path(), "x").is_err(), "a directory");
        assert!(check_new(&dir.path().join("no/such.kfk"), "x").is_err());
        std::os::unix::fs::symlink("/nonexistent", dir.path().join("link")).unwrap();
        assert!(
            check_new(&dir.path().join("link"), "x").is_err(),
            "a dangling link"
        );
    }

    #[test]
    fn a_writer_that_fails_leaves_no_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("e.kfe");
        let failed: std::io::Result<()> = write_new_with(&out, |f| {
            f.write_all(b"half")?;
            Err(std::io::Error::other("the writer gave up"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // A temporary file a running writer holds blocks the next write, which says so
        // and leaves it alone.
        let tmp = dir.path().join(".e.kfe.tmp");
        std::fs::write(&tmp, b"being written").unwrap();
        let writer = std::fs::File::open(&tmp).unwrap();
        writer.lock().unwrap();
        let blocked = write_new(&out, b"x").unwrap_err();
        assert!(
            blocked.to_string().contains("another keyfab is writing"),
            "{blocked}"
        );
        assert_eq!(std::fs::read(&tmp).unwrap(), b"being written");
        assert!(!out.exists());
        // One nobody holds was left by a writer that stopped (kill -9): the next write
        // takes its place, and leaves no temporary behind.
        drop(writer);
        write_new(&out, b"whole").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"whole");
        assert!(!tmp.exists());
        std::fs::remove_file(&out).unwrap();
        // A spool is anonymous: nothing appears in the directory.
        let _spool = spool_beside(&out).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
