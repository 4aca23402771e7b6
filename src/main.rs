//! The `graft` binary: a thin shell over the library. Parses arguments, runs one command, prints
//! one clear line and exits non-zero on error.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
