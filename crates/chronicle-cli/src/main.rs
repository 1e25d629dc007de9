//! The `chronicle` binary.

fn main() -> std::process::ExitCode {
    chronicle_cli::main()
}
