//! The `kmfs` binary: parse the command line, run, print one line on failure.

use clap::Parser;

fn main() {
    let args = kmfs::cli::normalize_args(std::env::args_os().collect());
    let cli = match kmfs::cli::Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                kmfs::exitcode::USAGE
            } else {
                0
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    if let Err(e) = kmfs::cli::run(cli) {
        eprintln!("kmfs: {e}");
        std::process::exit(e.exit_code());
    }
}
