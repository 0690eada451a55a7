//! What a command prints: text for people, or exactly one JSON document.

use keyfab_node::Error;

/// A command's result: the same facts as text and as JSON.
pub struct Report {
    pub text: String,
    pub json: serde_json::Value,
}

impl Report {
    pub fn new(text: impl Into<String>, json: serde_json::Value) -> Self {
        Self {
            text: text.into(),
            json,
        }
    }
}

/// A failed command: stable code, message, exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: &'static str,
    pub message: String,
    pub exit_code: i32,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure {
            code: e.code(),
            message: e.to_string(),
            exit_code: e.exit_code(),
        }
    }
}

impl Failure {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
            exit_code: 1,
        }
    }

    /// Arguments that do not go together (exit 2, code `usage`).
    pub fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: "usage",
            message: message.into(),
            exit_code: 2,
        }
    }
}

pub fn print_report(r: &Report, json: bool) {
    if json {
        println!("{}", r.json);
    } else if !r.text.is_empty() {
        println!("{}", r.text.trim_end());
    }
}

pub fn print_error(e: &Failure, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({"error": {"code": e.code, "message": e.message}})
        );
    } else {
        eprintln!("error[{}]: {}", e.code, e.message);
    }
}

/// A progress bar on stderr for long work, only when stderr is a terminal and the output
/// is not `--json`.
pub struct Progress {
    /// Updates the bar, if there is one; what long operations are handed to report to.
    report: Option<Box<dyn Fn(u64, u64) + Sync>>,
}

impl Progress {
    /// A bar on standard error that reads "{verb} {noun}", only when `wanted` and
    /// standard error is a terminal (never in `--json` output or a pipe).
    pub fn new(verb: &'static str, noun: &'static str, wanted: bool) -> Self {
        use std::io::IsTerminal;
        let report = (wanted && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} ({percent}%, {per_sec}, {eta} left)",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            Box::new(move |done: u64, total: u64| {
                if bar.length() != Some(total) {
                    bar.set_length(total);
                    bar.set_message(format!("{verb} {noun}"));
                }
                bar.set_position(done);
                if done >= total {
                    bar.finish();
                }
            }) as Box<dyn Fn(u64, u64) + Sync>
        });
        Self { report }
    }

    /// The callback to hand to a long operation; `None` when there is no bar, so the
    /// operation skips the bookkeeping.
    pub fn reporter(&self) -> Option<&(dyn Fn(u64, u64) + Sync)> {
        self.report.as_deref()
    }
}
