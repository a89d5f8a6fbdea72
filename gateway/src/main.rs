//! The `relayguard` binary; everything lives in the library.
fn main() -> std::process::ExitCode {
    relayguard::cli::main()
}
