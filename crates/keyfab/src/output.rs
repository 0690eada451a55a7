//! What a command prints: text for people, or exactly one JSON document.

use keyfab_node::{Code, Error};

/// A command's result: the same facts as text and as JSON.
#[derive(Debug)]
pub(crate) struct Report {
    pub text: String,
    pub json: serde_json::Value,
}

impl Report {
    pub(crate) fn new(text: impl Into<String>, json: serde_json::Value) -> Self {
        Self {
            text: text.into(),
            json,
        }
    }

    /// The report of a typed result: its text, and its serde form as the JSON, so the
    /// two cannot say different things.
    pub(crate) fn of(outcome: &impl Outcome) -> Result<Self, Failure> {
        let json = serde_json::to_value(outcome)
            .map_err(|e| Failure::new(Code::Internal, format!("rendering the result: {e}")))?;
        Ok(Self::new(outcome.text(), json))
    }
}

/// A command's typed result: the facts it established, which the dispatcher renders —
/// text for people, its serde form for `--json` — and which `demo` and `bench`, calling
/// the same commands, read as fields.
pub(crate) trait Outcome: serde::Serialize {
    /// The text for people.
    fn text(&self) -> String;
}

/// A failed command: its stable code (which gives the exit code) and message.
#[derive(Debug)]
pub(crate) struct Failure {
    pub code: Code,
    pub message: String,
    /// What was done before the command stopped short (a lot with devices not done):
    /// printed like a result, with the error.
    pub summary: Option<Box<Report>>,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::new(e.code(), e.to_string())
    }
}

/// A failure after the site may have released a device's keys: the keys are not lost —
/// the site answers the same request id with the same keys — so the message gives the
/// request id and `again`, the command that fetches them.
pub(crate) fn after_release(f: Failure, request_id: &str, again: &str) -> Failure {
    Failure::new(
        f.code,
        format!(
            "{}. The device's keys are kept for request id {request_id}: nothing is lost, and this gets the same answer again:\n  {again}",
            f.message
        ),
    )
}

/// A file that could not be read or written, with its path (code `io`, exit 1).
pub(crate) fn io_fail(path: &std::path::Path, e: std::io::Error) -> Failure {
    Failure::new(Code::Io, format!("{}: {e}", path.display()))
}

/// The bytes of an input file, read in bounded memory: beyond `cap` bytes it is refused
/// as `malformed` (exit 4) without reading more (see [`keyfab_formats::read_capped`]).
pub(crate) fn read_input(path: &std::path::Path, cap: usize) -> Result<Vec<u8>, Failure> {
    keyfab_formats::read_capped(path, cap).map_err(|e| read_failure(path, e))
}

fn read_failure(path: &std::path::Path, e: keyfab_formats::FormatError) -> Failure {
    match e {
        keyfab_formats::FormatError::Io(e) => io_fail(path, e),
        other => {
            let mut f = Failure::from(Error::from(other));
            f.message = format!("{}: {}", path.display(), f.message);
            f
        }
    }
}

/// [`read_input`] of a text file: bytes that are not UTF-8 are `malformed` as well.
pub(crate) fn read_input_text(path: &std::path::Path, cap: usize) -> Result<String, Failure> {
    String::from_utf8(read_input(path, cap)?).map_err(|e| {
        read_failure(
            path,
            keyfab_formats::FormatError::malformed(
                keyfab_formats::Malformed::Encoding,
                format!(
                    "not UTF-8 text (byte {} is not)",
                    e.utf8_error().valid_up_to()
                ),
            ),
        )
    })
}

impl Failure {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
            summary: None,
        }
    }

    /// This failure, with what was done before it: `--json` prints the summary's
    /// fields with an `error` member, text prints the summary, then the error.
    pub(crate) fn with_summary(mut self, summary: Report) -> Self {
        self.summary = Some(Box::new(summary));
        self
    }

    /// Arguments that do not go together (exit 2, code `usage`).
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Failure::new(Code::Usage, message)
    }

    /// The process exit code: the code's (README.md, "Exit codes and error codes").
    pub(crate) fn exit_code(&self) -> u8 {
        self.code.exit_code()
    }
}

/// Prints a report on standard output. A reader that went away (`… | head -c 10`) is
/// not an error of the command: whatever it did is done, and nothing is left to say to
/// anyone, so the process ends quietly — no panic, no backtrace.
pub(crate) fn print_report(r: &Report, json: bool) {
    if json {
        print_out(&r.json.to_string());
    } else if !r.text.is_empty() {
        print_out(r.text.trim_end());
    }
}

pub(crate) fn print_error(e: &Failure, json: bool) {
    let error = serde_json::json!({"code": e.code.as_str(), "message": e.message});
    if json {
        let mut out = match e.summary.as_deref().map(|s| s.json.clone()) {
            Some(serde_json::Value::Object(fields)) => fields,
            _ => serde_json::Map::new(),
        };
        out.insert("error".into(), error);
        print_out(&serde_json::Value::Object(out).to_string());
    } else {
        if let Some(summary) = &e.summary {
            print_report(summary, false);
        }
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "error[{}]: {}", e.code, e.message);
    }
}

/// One line on standard output; a closed or failing standard output is ignored (see
/// [`print_report`]).
fn print_out(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// A progress bar on stderr for long work, only when stderr is a terminal and the output
/// is not `--json`.
pub(crate) struct Progress {
    /// Updates the bar, if there is one; what long operations are handed to report to.
    report: Option<Box<dyn Fn(u64, u64) + Sync>>,
}

impl Progress {
    /// A bar on standard error that reads "{verb} {noun}", only when `wanted` and
    /// standard error is a terminal (never in `--json` output or a pipe).
    pub(crate) fn new(verb: &'static str, noun: &'static str, wanted: bool) -> Self {
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
    pub(crate) fn reporter(&self) -> Option<&(dyn Fn(u64, u64) + Sync)> {
        self.report.as_deref()
    }
}

/// The chip's transport key of `--transport-key FILE`: a P-256 public key, PEM.
pub(crate) fn read_transport_key(
    path: &std::path::Path,
) -> Result<keyfab_crypto::hpke::HpkePublicKey, Failure> {
    let text = read_input_text(path, keyfab_formats::MAX_SMALL_INPUT)?;
    let refused = |e: &dyn std::fmt::Display| {
        Failure::new(
            Code::InvalidInput,
            format!("--transport-key {}: {e}", path.display()),
        )
    };
    let spki = keyfab_crypto::x509::from_pem(&text, "PUBLIC KEY").map_err(|e| refused(&e))?;
    match keyfab_crypto::x509::device_public_key(&spki).map_err(|e| refused(&e))? {
        keyfab_crypto::x509::DevicePublicKey::P256(point) => {
            keyfab_crypto::hpke::HpkePublicKey::from_sec1(&point).map_err(|e| refused(&e))
        }
        _ => Err(refused(&"a transport key is a P-256 key")),
    }
}

/// The certificates of `--chip-chain FILE` (PEM or DER), leaf first.
pub(crate) fn read_chip_chain(path: &std::path::Path) -> Result<Vec<Vec<u8>>, Failure> {
    let bytes = read_input(path, keyfab_crypto::x509::chip::MAX_CHIP_CHAIN_BYTES)?;
    keyfab_crypto::x509::chip::read_chip_chain(&bytes).map_err(|e| {
        Failure::new(
            Code::InvalidInput,
            format!("--chip-chain {}: {e}", path.display()),
        )
    })
}
