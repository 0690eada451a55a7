//! `keyfab`: parse, dispatch, print the result or the error, exit with its code.
#![forbid(unsafe_code)]

#[cfg(feature = "bench")]
mod bench;
#[cfg(feature = "bench")]
mod bench_cpu;
#[cfg(feature = "bench")]
mod bench_flood;
#[cfg(feature = "bench")]
mod bench_serve;
mod cli;
mod context;
mod demo;
mod line;
mod logsink;
mod manual;
mod output;
mod run;
mod sd_notify;
mod serve_config;

use clap::{CommandFactory, FromArgMatches};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let parsed = cli::Cli::command().try_get_matches().and_then(|m| {
        cli::Cli::from_arg_matches(&m).map(|mut cli| {
            if let cli::Command::Site(cli::SiteCommand::Serve(serve)) = &mut cli.command {
                serve.explicit = cli::explicit_serve_args(&m);
            }
            (cli, cli::home_secrets(&m))
        })
    });
    let (cli, secrets) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            // Help and version go to stdout as clap prints them; a usage error with
            // --json is still one JSON document (README.md, "Exit codes and error codes"), exit 2.
            let wants_json = std::env::args().any(|a| a == "--json");
            if wants_json && e.use_stderr() {
                let usage = output::Failure::usage(e.render().to_string().trim());
                output::print_error(&usage, true);
                return std::process::ExitCode::from(usage.exit_code());
            }
            // A reader gone (`--help | head -1`) is not an error of ours.
            let _ = e.print();
            return exit_code(e.exit_code());
        }
    };
    let json = cli.json;
    match run::dispatch(cli, secrets) {
        Ok(report) => {
            output::print_report(&report, json);
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            output::print_error(&e, json);
            std::process::ExitCode::from(e.exit_code())
        }
    }
}

/// The process's exit status for `code` (0–255; anything else is 1, never success).
fn exit_code(code: i32) -> std::process::ExitCode {
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
