//! `acme-bootsync`: bootsync's own entry point, with the acme initialisers linked in.

fn main() -> std::process::ExitCode {
    acme_initialisers::link();
    bootsync::cli::main()
}
