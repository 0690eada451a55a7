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

/// Progress of long work on stderr, only when stderr is a terminal: every 10 %, then
/// the final count. Quiet under `--json` and in pipes.
pub struct Progress {
    enabled: bool,
    verb: &'static str,
    noun: &'static str,
    last_tenth: std::sync::atomic::AtomicU64,
}

impl Progress {
    pub fn new(verb: &'static str, noun: &'static str, wanted: bool) -> Self {
        use std::io::IsTerminal;
        Self {
            enabled: wanted && std::io::stderr().is_terminal(),
            verb,
            noun,
            last_tenth: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn update(&self, done: u64, total: u64) {
        if !self.enabled || total == 0 {
            return;
        }
        let tenth = done * 10 / total;
        if self
            .last_tenth
            .swap(tenth, std::sync::atomic::Ordering::Relaxed)
            != tenth
        {
            eprint!(
                "\r{} {done}/{total} {} ({}%)",
                self.verb,
                self.noun,
                tenth * 10
            );
            if done == total {
                eprintln!();
            }
        }
    }
}
