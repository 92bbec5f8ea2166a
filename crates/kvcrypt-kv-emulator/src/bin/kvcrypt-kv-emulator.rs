fn main() -> std::process::ExitCode {
    kvcrypt_kv_emulator::cli_main()
}
