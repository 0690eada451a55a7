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
    bar: Option<indicatif::ProgressBar>,
    verb: &'static str,
    noun: &'static str,
}

impl Progress {
    pub fn new(verb: &'static str, noun: &'static str, wanted: bool) -> Self {
        use std::io::IsTerminal;
        let bar = (wanted && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} ({percent}%, {per_sec}, {eta} left)",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        Self { bar, verb, noun }
    }

    pub fn enabled(&self) -> bool {
        self.bar.is_some()
    }

    pub fn update(&self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            if bar.length() != Some(total) {
                bar.set_length(total);
                bar.set_message(format!("{} {}", self.verb, self.noun));
            }
            bar.set_position(done);
            if done >= total {
                bar.finish();
            }
        }
    }
}
