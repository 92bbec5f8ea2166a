fn main() -> std::process::ExitCode {
    kvcrypt::emulator::cli_main()
}
