//! `keyfab policy test`: a policy module run against its cases.

use super::provision::MAX_LIST_BYTES;
use crate::output::{read_input, read_input_text, Failure, Outcome, Report};
use keyfab_node::Code;
use std::path::Path;

/// `keyfab policy test`: the module checked as HQ checks it, then every case in order.
pub(crate) fn policy_test(module_path: &Path, cases_path: &Path) -> Result<Report, Failure> {
    let bytes = read_input(module_path, 4 * keyfab_policy_code::MAX_MODULE_BYTES)?;
    let wasm = keyfab_policy_code::module_bytes(module_path, bytes)
        .map_err(|e| Failure::new(Code::Malformed, e.to_string()))?;
    let module = keyfab_policy_code::PolicyModule::load(&wasm)
        .map_err(|e| Failure::new(Code::Malformed, format!("{}: {e}", module_path.display())))?;
    let text = read_input_text(cases_path, MAX_LIST_BYTES)?;
    let file: keyfab_policy_code::cases::CaseFile = serde_json::from_str(&text)
        .map_err(|e| Failure::new(Code::Malformed, format!("{}: {e}", cases_path.display())))?;
    let report = keyfab_policy_code::cases::run_cases(&module, &file)
        .map_err(|e| Failure::new(Code::Malformed, format!("{}: {e}", cases_path.display())))?;
    let cases: Vec<CaseResult> = report
        .outcomes
        .iter()
        .map(|o| CaseResult {
            case: o.case,
            name: o.name.clone(),
            runs: o.runs,
            expected: file.cases[o.case - 1]
                .expect
                .clone()
                .unwrap_or_else(|| "confirm failed".into()),
            passed: o.mismatch.is_none(),
            failed_run: o.mismatch.as_ref().map(|(run, _)| *run),
            got: o.mismatch.as_ref().map(|(_, got)| got.clone()),
            fuel_max: o.fuel_max,
        })
        .collect();
    let tested = PolicyTested {
        module: module_path.to_owned(),
        sha256: hex::encode(keyfab_crypto::hash::sha256(&wasm)),
        failed: report.failed().count(),
        evaluations: report.evaluations,
        fuel_max: report.fuel_max,
        cases,
    };
    if tested.failed > 0 {
        return Err(Failure::new(Code::PolicyTestFailed, tested.text()));
    }
    Report::of(&tested)
}

/// `policy test`: every case's outcome, and the module's cost.
#[derive(serde::Serialize)]
struct PolicyTested {
    module: std::path::PathBuf,
    sha256: String,
    cases: Vec<CaseResult>,
    evaluations: u64,
    fuel_max: u64,
    failed: usize,
}

#[derive(serde::Serialize)]
struct CaseResult {
    case: usize,
    name: String,
    runs: u32,
    expected: String,
    passed: bool,
    failed_run: Option<u32>,
    got: Option<String>,
    fuel_max: u64,
}

impl Outcome for PolicyTested {
    fn text(&self) -> String {
        let mut text = format!(
            "{}: {} of {} cases hold ({} evaluations, at most {} fuel of {})",
            self.module.display(),
            self.cases.len() - self.failed,
            self.cases.len(),
            self.evaluations,
            self.fuel_max,
            keyfab_policy_code::FUEL_PER_DECISION
        );
        for c in &self.cases {
            let times = if c.runs == 1 {
                String::new()
            } else {
                format!(" ×{}", c.runs)
            };
            text.push_str(&match (&c.failed_run, &c.got) {
                (Some(run), Some(got)) => format!(
                    "\n  FAIL  {}{times}: expected {}, run {run} gave {got}",
                    c.name, c.expected
                ),
                _ => format!("\n  ok    {}{times}: {}", c.name, c.expected),
            });
        }
        text
    }
}
