fn main() -> std::process::ExitCode {
    kvcrypt::cli::main()
}
