//! A home on disk: private to the user who runs keyfab, whatever the umask.
//!
//! A home holds the sealed keystore and the state (encrypted key material, the audit
//! log): another user who can read them can attack the passphrase offline, or copy the
//! state to roll it back later. So a home is created 0700 and every file in it 0600,
//! set explicitly rather than left to the umask; and a home another user can enter is
//! refused when it is opened, with the command that closes it.

use crate::{Error, Result};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of a home directory: its user only.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file keyfab writes into a home.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and missing parents) and makes it 0700, also when it existed (an
/// empty directory the operator made beforehand).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
}

/// Writes `bytes` to `path` (created or replaced), 0600 whatever the umask, and syncs it.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    // `mode` applies only to a file created now, and under the umask.
    f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Refuses a home that users other than its owner can enter or list (`insecure_home`).
pub fn check_private(dir: &Path) -> Result<()> {
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    Err(Error::InsecureHome(format!(
        "{} is open to other users (mode {mode:03o}): it holds the sealed keystore and the \
         state, which must be private to the user who runs keyfab. Close it with \
         `chmod -R go= {}` and run the command again",
        dir.display(),
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_home_and_its_files_are_private_whatever_the_umask_allowed() {
        let base = tempfile::tempdir().unwrap();
        let home = base.path().join("a").join("home");
        // A directory made beforehand, open to all, is closed.
        std::fs::create_dir_all(&home).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o777)).unwrap();
        create_private_dir(&home).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&home), 0o700);
        // A file that existed open to all is closed too when written.
        let file = home.join("f");
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_private_file(&file, b"secret").unwrap();
        assert_eq!(mode(&file), 0o600);
        assert!(check_private(&home).is_ok());
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
        let refused = check_private(&home).unwrap_err();
        assert_eq!(refused.code(), crate::Code::InsecureHome);
        assert!(refused.to_string().contains("chmod -R go="), "{refused}");
    }
}
