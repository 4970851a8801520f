//! The `bootsync` binary: everything lives in the library so third parties can reuse it.

fn main() -> std::process::ExitCode {
    bootsync::cli::main()
}
