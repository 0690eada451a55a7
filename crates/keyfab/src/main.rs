//! `keyfab`: parse, dispatch, print the result or the error, exit with its code.
#![forbid(unsafe_code)]

mod bench;
mod cli;
mod context;
mod demo;
mod output;
mod run;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    let json = cli.json;
    let code = match run::dispatch(cli) {
        Ok(report) => {
            output::print_report(&report, json);
            0
        }
        Err(e) => {
            output::print_error(&e, json);
            e.exit_code
        }
    };
    std::process::exit(code);
}
