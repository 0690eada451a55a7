//! `keyfab`: parse, dispatch, print the result or the error, exit with its code.
#![forbid(unsafe_code)]

mod bench;
mod bench_cpu;
mod bench_flood;
mod bench_serve;
mod cli;
mod context;
mod demo;
mod line;
mod logsink;
mod output;
mod run;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout as clap prints them; a usage error with
            // --json is still one JSON document (README.md, "Exit codes and error codes"), exit 2.
            let wants_json = std::env::args().any(|a| a == "--json");
            if wants_json && e.use_stderr() {
                output::print_error(
                    &output::Failure {
                        code: "usage",
                        message: e.render().to_string().trim().to_owned(),
                        exit_code: 2,
                    },
                    true,
                );
                std::process::exit(2);
            }
            e.exit();
        }
    };
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
