/// Every heap block is wiped when it is freed (or moved by a `realloc`). Key material is meant
/// to live only in secret memory (`secmem`), but on its way there it passes through buffers
/// kvcrypt does not own — the Key Vault SDK's response body, its JSON decoder, rustls' record
/// buffers — which are freed without being wiped. The allocator is the backstop that keeps
/// those freed buffers from holding a copy of the key for the rest of the process's life.
#[global_allocator]
static ALLOC: zalloc::ZeroizingAlloc<std::alloc::System> =
    zalloc::ZeroizingAlloc(std::alloc::System);

fn main() -> std::process::ExitCode {
    kvcrypt::cli::main()
}
