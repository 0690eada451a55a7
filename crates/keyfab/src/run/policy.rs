//! `keyfab policy test`: a policy module run against its cases.

use super::provision::MAX_LIST_BYTES;
use crate::output::{read_input, read_input_text, Failure, Report};
use keyfab_node::Code;
use serde_json::json;
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
    let mut lines = Vec::new();
    let mut results = Vec::new();
    for o in &report.outcomes {
        let expected = file.cases[o.case - 1]
            .expect
            .clone()
            .unwrap_or_else(|| "confirm failed".into());
        let times = if o.runs == 1 {
            String::new()
        } else {
            format!(" ×{}", o.runs)
        };
        match &o.mismatch {
            None => lines.push(format!("  ok    {}{times}: {expected}", o.name)),
            Some((run, got)) => lines.push(format!(
                "  FAIL  {}{times}: expected {expected}, run {run} gave {got}",
                o.name
            )),
        }
        results.push(json!({
            "case": o.case,
            "name": o.name,
            "runs": o.runs,
            "expected": expected,
            "passed": o.mismatch.is_none(),
            "failed_run": o.mismatch.as_ref().map(|(run, _)| run),
            "got": o.mismatch.as_ref().map(|(_, got)| got),
            "fuel_max": o.fuel_max,
        }));
    }
    let failed = report.failed().count();
    let sha256 = keyfab_crypto::hash::sha256(&wasm);
    let summary = format!(
        "{}: {} of {} cases hold ({} evaluations, at most {} fuel of {})",
        module_path.display(),
        report.outcomes.len() - failed,
        report.outcomes.len(),
        report.evaluations,
        report.fuel_max,
        keyfab_policy_code::FUEL_PER_DECISION
    );
    if failed > 0 {
        return Err(Failure::new(
            Code::PolicyTestFailed,
            format!("{summary}\n{}", lines.join("\n")),
        ));
    }
    Ok(Report::new(
        format!("{summary}\n{}", lines.join("\n")),
        json!({
            "module": module_path,
            "sha256": hex::encode(sha256),
            "cases": results,
            "evaluations": report.evaluations,
            "fuel_max": report.fuel_max,
            "failed": failed,
        }),
    ))
}
