//! The command line's text, pinned: every command's `--help` and the usage errors a
//! hurried operator meets, each compared with its snapshot in `tests/snapshots/`. A change
//! to the CLI shows up here as a diff to review; after an intended change, rewrite the
//! snapshots with `KEYFAB_BLESS=1 cargo test -p keyfab --test e2e help::`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn snapshots() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots")
}

/// What `keyfab ARGS` prints and how it exits, as one text.
fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_keyfab"))
        .args(args)
        .env_remove("KEYFAB_HOME")
        .env_remove("KEYFAB_PASSPHRASE")
        .output()
        .expect("run keyfab");
    format!(
        "$ keyfab {}\nexit: {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        out.status
            .code()
            .map_or("signal".to_owned(), |c| c.to_string()),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The subcommands `keyfab PATH --help` lists (its "Commands:" section, `help` aside).
fn subcommands(path: &[String]) -> Vec<String> {
    let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
    args.push("--help");
    let out = Command::new(env!("CARGO_BIN_EXE_keyfab"))
        .args(&args)
        .output()
        .expect("run keyfab");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect()
}

/// Compares `actual` with the snapshot `name`, or writes it under KEYFAB_BLESS; returns
/// a line saying what differs, if anything does.
fn check(name: &str, actual: &str) -> Option<String> {
    let path = snapshots().join(format!("{name}.txt"));
    if std::env::var_os("KEYFAB_BLESS").is_some() {
        std::fs::create_dir_all(snapshots()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return None;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    if expected == actual {
        return None;
    }
    let line = expected
        .lines()
        .zip(actual.lines())
        .position(|(e, a)| e != a)
        .unwrap_or(expected.lines().count().min(actual.lines().count()));
    Some(format!(
        "{name}: differs from line {} (expected {:?}, got {:?})",
        line + 1,
        expected.lines().nth(line).unwrap_or("<end>"),
        actual.lines().nth(line).unwrap_or("<end>")
    ))
}

/// Arguments of a help text that say nothing about themselves: an option or a
/// positional whose line ends after its name (clap's short form puts the help there).
fn undocumented(name: &str, help: &str) -> Vec<String> {
    help.lines()
        .filter(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let starts = words
                .first()
                .is_some_and(|w| w.starts_with("--") || w.starts_with('<') || w.starts_with("-"));
            // `--flag`, `--flag <V>`, `-x, --flag <V>`, `<FILE>`: nothing after them, but
            // the line is padded as if help followed.
            starts && words.len() <= 3 && line.ends_with(' ')
        })
        .map(|line| format!("{name}: no help for `{}`", line.trim()))
        .collect()
}

#[test]
#[cfg_attr(
    not(feature = "bench"),
    ignore = "the snapshots are of the default build, which has `keyfab bench`"
)]
fn every_help_matches_its_snapshot() {
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let (mut differ, mut seen) = (Vec::new(), Vec::new());
    while let Some(path) = todo.pop() {
        let name = std::iter::once("keyfab".to_owned())
            .chain(path.iter().cloned())
            .collect::<Vec<_>>()
            .join("-");
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let help = run(&args);
        differ.extend(undocumented(&name, &help));
        differ.extend(check(&name, &help));
        seen.push(format!("{name}.txt"));
        for sub in subcommands(&path) {
            let mut next = path.clone();
            next.push(sub);
            todo.push(next);
        }
    }
    assert!(seen.len() > 40, "only {} commands found", seen.len());
    // A snapshot without its command: a command was removed or renamed.
    if std::env::var_os("KEYFAB_BLESS").is_none() {
        for entry in std::fs::read_dir(snapshots()).unwrap() {
            let file = entry.unwrap().file_name().to_string_lossy().into_owned();
            if file.starts_with("keyfab") && !seen.contains(&file) {
                differ.push(format!("{file}: no command has this help any more"));
            }
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}

#[test]
fn usage_errors_match_their_snapshots() {
    let cases: [(&str, &[&str]); 6] = [
        ("usage-no-command", &[]),
        ("usage-unknown-command", &["sight", "provision"]),
        (
            "usage-missing-argument",
            &["site", "provision", "--home", "h"],
        ),
        (
            "usage-unknown-flag",
            &["hq", "report", "--home", "h", "--colour"],
        ),
        (
            "usage-bad-value",
            &["hq", "report", "--home", "h", "--format", "pdf"],
        ),
        (
            "usage-json",
            &[
                "--json",
                "site",
                "provision",
                "--home",
                "h",
                "--entitlement",
                "e",
            ],
        ),
    ];
    let differ: Vec<String> = cases
        .iter()
        .filter_map(|(name, args)| check(name, &run(args)))
        .collect();
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}

/// `text` with what differs from run to run replaced by a name for it: the run's
/// directory, ports, times, ids, digests, serials and sizes.
fn normalized(text: &str, dir: &Path) -> String {
    let text = text.replace(&dir.display().to_string(), "DIR");
    let rules = [
        (r"127\.0\.0\.1:\d+", "127.0.0.1:PORT"),
        (r"serial [0-9a-f]+", "serial SERIAL"),
        // A station that reconnects under load (a kept-alive connection timed out).
        (
            r"stopped after \d+ connections",
            "stopped after N connections",
        ),
        (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "TIME"),
        (r"\b[0-9a-f]{64}\b", "SHA256"),
        (r"\b[0-9a-f]{32}\b", "ID"),
        (r"\b\d+ bytes\b", "N bytes"),
    ];
    rules.iter().fold(text, |t, (pattern, name)| {
        regex::Regex::new(pattern)
            .unwrap()
            .replace_all(&t, *name)
            .into_owned()
    })
}

/// The main journey's text as an operator reads it — every step of `keyfab demo`, from
/// the root CA to HQ's report, each printed by the command that does it — pinned, with
/// what differs from run to run named instead.
#[test]
fn the_journeys_text_matches_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("demo");
    let out = Command::new(env!("CARGO_BIN_EXE_keyfab"))
        .args(["demo", "--dir", &home.display().to_string()])
        .env_remove("KEYFAB_HOME")
        .env_remove("KEYFAB_PASSPHRASE")
        .output()
        .expect("run keyfab demo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = normalized(&String::from_utf8_lossy(&out.stdout), &home);
    if let Some(differs) = check("output-demo", &text) {
        panic!("{differs}");
    }
}
