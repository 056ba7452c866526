//! The `edge-outbox` binary: everything lives in the library; see `cli`.

fn main() -> std::process::ExitCode {
    edge_outbox::cli::main()
}
