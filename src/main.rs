//! The `kn` binary: everything lives in the library; see `kn --help`.

fn main() -> std::process::ExitCode {
    kn::cli::main()
}
