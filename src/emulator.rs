//! Local Azure Key Vault emulator (REST over TLS). (Owned by the emulator work.)

pub fn cli_main() -> std::process::ExitCode {
    eprintln!("kvcrypt-kv-emulator: not implemented yet");
    std::process::ExitCode::from(1)
}
