//! Build facts for `keyfab --version`: the commit the binary was built from and that
//! commit's date — the same for every build of one commit, so builds stay reproducible —
//! or what a packager sets (`KEYFAB_COMMIT`, `SOURCE_DATE_EPOCH`) when the source is not
//! a git checkout.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=KEYFAB_COMMIT");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let dot_git = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.git");
    for watched in ["HEAD", "refs/heads", "packed-refs"] {
        let path = dot_git.join(watched);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    let commit = std::env::var("KEYFAB_COMMIT")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let date = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(epoch) => epoch_date(&epoch),
        Err(_) => git(&["log", "-1", "--format=%cs"]),
    }
    .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=KEYFAB_COMMIT={commit}");
    println!("cargo:rustc-env=KEYFAB_BUILD_DATE={date}");
}

/// `SOURCE_DATE_EPOCH` (Unix seconds) as a UTC date, by the civil-from-days algorithm.
fn epoch_date(epoch: &str) -> Option<String> {
    let days = epoch.trim().parse::<i64>().ok()?.div_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    Some(format!("{year:04}-{month:02}-{day:02}"))
}
