//! `keyfab completions` and `keyfab man`: shell completions and manual pages made from
//! the command line's own definition, so they never drift from what `--help` says.

use crate::cli::{Cli, CompletionShell};
use crate::output::{io_fail, Failure, Report};
use clap::CommandFactory;
use serde_json::json;
use std::path::Path;

/// The completion script for `shell`.
pub(crate) fn completions(shell: CompletionShell) -> Result<Report, Failure> {
    use clap_complete::Shell;
    let (generator, name) = match shell {
        CompletionShell::Bash => (Shell::Bash, "bash"),
        CompletionShell::Zsh => (Shell::Zsh, "zsh"),
        CompletionShell::Fish => (Shell::Fish, "fish"),
    };
    let mut script = Vec::new();
    clap_complete::generate(generator, &mut Cli::command(), "keyfab", &mut script);
    let script = String::from_utf8_lossy(&script).into_owned();
    Ok(Report::new(
        script.clone(),
        json!({"shell": name, "script": script}),
    ))
}

/// Every command's manual page into `out`.
pub(crate) fn man_pages(out: &Path) -> Result<Report, Failure> {
    std::fs::create_dir_all(out).map_err(|e| io_fail(out, e))?;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    write_pages(cmd, out, &mut written)?;
    written.sort();
    Ok(Report::new(
        format!(
            "{} manual pages written to {}",
            written.len(),
            out.display()
        ),
        json!({"dir": out, "pages": written}),
    ))
}

/// `cmd`'s page and its subcommands', depth first; each named after its path
/// (`keyfab-site-provision.1`).
fn write_pages(cmd: clap::Command, out: &Path, written: &mut Vec<String>) -> Result<(), Failure> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
        write_pages(sub, out, written)?;
    }
    let man = clap_mangen::Man::new(cmd);
    let name = man.get_filename();
    let path = out.join(&name);
    let mut page = Vec::new();
    man.render(&mut page).map_err(|e| io_fail(&path, e))?;
    std::fs::write(&path, page).map_err(|e| io_fail(&path, e))?;
    written.push(name);
    Ok(())
}
