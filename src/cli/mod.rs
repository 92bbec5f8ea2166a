//! Command-line edge: clap definitions, dispatch, and the exit code of a failed command.
//! Every handler returns `Result<_, Failure>`: a typed error's exit code is fixed where `?`
//! converts it (see `kvcrypt_exit::Failure`), and `main` only reads it.
//! Handlers live in one file per command group; this file only wires them.

mod agentcmd;
mod docs;
mod pinning;
mod serve;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use kvcrypt_datapath::transport::TransportKind;
use kvcrypt_exit::{Exit, ExitClass, Failure};

/// Default configuration file (vault credentials, volumes, agent policy).
pub const DEFAULT_CONFIG: &str = "/etc/kvcrypt/kvcrypt.toml";

#[derive(Debug, Parser)]
#[command(
    name = "kvcrypt",
    version,
    about = "Block-device encryption with keys held in your Azure Key Vault / Managed HSM",
    long_about = "kvcrypt encrypts a block device with AES-256-XTS under a random volume master key \
                  (VMK). The VMK is stored on the device only wrapped by a key in the customer's Azure \
                  Key Vault or Managed HSM; revoking access to that key locks the data."
)]
pub struct Cli {
    /// Configuration file (vault credentials, volumes, policies).
    #[arg(long, global = true, env = "KVCRYPT_CONFIG", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,

    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a new kvcrypt header to DEVICE, wrapping a fresh volume key with one or more Key
    /// Vault keys (--policy any / all / k-of-n says how many of them unlock).
    Format(FormatArgs),
    /// Inspect, back up or restore the volume header.
    #[command(subcommand)]
    Header(HeaderCmd),
    /// Print udev IMPORT{program} properties for a kvcrypt volume (silent, non-zero otherwise).
    Probe(ProbeArgs),
    /// Add a key slot wrapped by another key (or the latest key version), or the customer-held
    /// recovery slot; optionally remove slots.
    Rewrap(RewrapArgs),
    /// Unlock DEVICE offline with the customer's recovery private key (no vault, no
    /// configuration), then print what dm-crypt needs or re-wrap the key into a new Key Vault slot.
    Recover(RecoverArgs),
    /// Measure the XTS engine (MB/s per core), like `cryptsetup benchmark`.
    Benchmark(BenchmarkArgs),
    /// Unlock DEVICE and serve its plaintext as a block device named NAME (handed to the
    /// running agent, which access-checks it until `kvcrypt close`).
    Open(OpenArgs),
    /// Flush and remove the served device NAME.
    Close(CloseArgs),
    /// Run the agent daemon (boot-time unlock, access checks, revocation handling).
    Agent(AgentArgs),
    /// Lock a volume now: freeze, suspend I/O, wipe its key (as on revocation).
    Lock(NameArgs),
    /// Undo `kvcrypt lock`: unwrap the key again and resume I/O.
    Unlock(NameArgs),
    /// Show the state of volumes served by the agent.
    Status(StatusArgs),
    /// Print shell completions.
    Completions(CompletionsArgs),
    /// Write man pages.
    Man(ManArgs),
    /// Internal: serve one volume (started by `open` and by the agent; reads its key from a pipe).
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Internal (udev, kvcrypt-attach@.service): a kvcrypt device appeared; ask the running
    /// agent to attach it, or unlock it directly when no agent runs.
    #[command(hide = true)]
    Attach(AttachArgs),
    /// Internal (udev PROGRAM=): print the volume name served by a block device (e.g. loop3).
    #[command(hide = true)]
    UdevName(UdevNameArgs),
}

#[derive(Debug, Args)]
pub struct FormatArgs {
    /// Block device or file to format.
    pub device: PathBuf,
    /// Versioned or versionless Key Vault key id: https://VAULT/keys/NAME[/VERSION].
    /// Repeatable: one key slot per key. With --policy all / k-of-n, each key must be in a
    /// different vault and wraps one share of the volume key.
    #[arg(long, required = true, value_name = "KEYID")]
    pub key_id: Vec<String>,
    /// How many of the keys it takes to unlock: `any` (default; each slot wraps the whole
    /// volume key, any one key unlocks, the volume locks when every key denies), `all` (the
    /// key is split: every key is needed, revoking any one locks the volume) or `k-of-n` (split
    /// with --threshold K: any K keys unlock, the volume locks when fewer than K grant).
    #[arg(long, value_enum, default_value = "any")]
    pub policy: volume::PolicyArg,
    /// With --policy k-of-n: how many keys unlock (1 < K <= number of --key-id).
    #[arg(long, value_name = "K")]
    pub threshold: Option<u8>,
    /// Wrap algorithm (default: RSA-OAEP-256 for RSA keys, A256KW / CKM_AES_KEY_WRAP for oct keys).
    #[arg(long)]
    pub algorithm: Option<String>,
    /// Volume label (up to 47 bytes of UTF-8).
    #[arg(long)]
    pub label: Option<String>,
    /// Encryption sector size in bytes.
    #[arg(long, default_value_t = 4096, value_parser = parse_sector_size)]
    pub sector_size: u32,
    /// Use this 64-byte volume master key (raw binary file) instead of a random one.
    #[arg(long)]
    pub master_key_file: Option<PathBuf>,
    /// Overwrite an existing kvcrypt header or filesystem/partition signature.
    #[arg(long)]
    pub yes: bool,
    /// Encrypt zeros over the whole data area (slow; hides which blocks were ever written).
    #[arg(long)]
    pub wipe: bool,
    /// Wrap with a key the configuration does not pin (`keys` of `[vault]`). The agent will
    /// not unlock the volume with it until it is pinned.
    #[arg(long)]
    pub allow_unpinned_key: bool,
    /// Also add a customer-held recovery slot: the volume key wrapped locally (RSA-OAEP-256)
    /// with this RSA public key (PEM, SPKI "PUBLIC KEY" or PKCS#1 "RSA PUBLIC KEY", 3072 or
    /// 4096 bits). `kvcrypt recover` opens the volume with the private key, without Key Vault.
    #[arg(long, value_name = "FILE")]
    pub recovery_public_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum HeaderCmd {
    /// Print the header (both copies' state, key slots).
    Dump(HeaderDumpArgs),
    /// Save both header copies and the metadata area to FILE.
    Backup {
        /// The kvcrypt volume (block device or image file).
        device: PathBuf,
        /// New file to write the raw 1 MiB header area to (created, mode 0600).
        file: PathBuf,
    },
    /// Write a header backup from FILE back to DEVICE.
    Restore {
        /// The device to write the backup's header onto.
        device: PathBuf,
        /// A file made by `kvcrypt header backup`.
        file: PathBuf,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Args)]
pub struct HeaderDumpArgs {
    /// The kvcrypt volume (block device or image file).
    pub device: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Unwrap and print the volume master key (hex) for emergency dm-crypt access. Root only;
    /// asks for confirmation on the terminal unless --yes-i-understand is given.
    #[arg(long)]
    pub dump_master_key: bool,
    /// Confirm --dump-master-key without a terminal prompt.
    #[arg(long, requires = "dump_master_key")]
    pub yes_i_understand: bool,
    /// Use a key the configuration does not pin (`keys` of `[vault]`), trusting the key ids
    /// on the disk for this command. Only for volumes whose disk you trust.
    #[arg(long, requires = "dump_master_key")]
    pub allow_unpinned_key: bool,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Device to probe (a name like `sdb` is taken relative to /dev).
    pub device: PathBuf,
}

#[derive(Debug, Args)]
pub struct RewrapArgs {
    /// The kvcrypt volume (block device or image file).
    pub device: PathBuf,
    /// Key to wrap the new slot with (default: latest version of the key of slot 0; with
    /// --recovery-public-key and no --key-id, no Key Vault slot is added). Split volumes
    /// (policy all / k-of-n): refused; without it every share is rewrapped to the latest
    /// version of its own key (changing a split volume's keys or threshold means re-formatting).
    #[arg(long)]
    pub key_id: Option<String>,
    /// Wrap algorithm for the new slot.
    #[arg(long)]
    pub algorithm: Option<String>,
    /// Remove this slot after adding the new one (repeatable). On a split volume a slot is
    /// removed only while another slot holds the same share.
    #[arg(long = "remove-slot")]
    pub remove_slot: Vec<u32>,
    /// Only remove slots, add none.
    #[arg(long)]
    pub no_add: bool,
    /// Unlock with, or add a slot for, a key the configuration does not pin (`keys` of
    /// `[vault]`), trusting the key ids on the disk for this command. Only for volumes whose disk you trust.
    #[arg(long)]
    pub allow_unpinned_key: bool,
    /// Add a customer-held recovery slot for this RSA public key (PEM, SPKI or PKCS#1, 3072 or
    /// 4096 bits), wrapped locally. Nothing changes if the recovery slot already holds this
    /// key; a recovery slot of another key is refused unless --replace-recovery is given.
    #[arg(long, value_name = "FILE")]
    pub recovery_public_key: Option<PathBuf>,
    /// Replace the volume's existing recovery slot with one for --recovery-public-key (the old
    /// private key no longer opens the volume).
    #[arg(long, requires = "recovery_public_key")]
    pub replace_recovery: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("action").required(true).args(["print_dm_crypt", "rewrap_key"])))]
pub struct RecoverArgs {
    /// The kvcrypt volume (block device, image file or a copy of its header area).
    pub device: PathBuf,
    /// The recovery private key (PEM, unencrypted PKCS#8 "PRIVATE KEY" or PKCS#1 "RSA PRIVATE
    /// KEY") whose public key was given to --recovery-public-key.
    #[arg(long, value_name = "FILE")]
    pub private_key: PathBuf,
    /// Print the volume master key and the dm-crypt command that opens the data with it (the
    /// output of `header dump --dump-master-key`). Needs no vault and no configuration.
    #[arg(long)]
    pub print_dm_crypt: bool,
    /// Wrap the volume key with this Key Vault key into a new key slot, so the agent and
    /// `open` unlock the volume again (needs the [vault] configuration; the key must be pinned).
    #[arg(long, value_name = "KEYID")]
    pub rewrap_key: Option<String>,
    /// Wrap algorithm for the new slot (with --rewrap-key).
    #[arg(long, requires = "rewrap_key")]
    pub algorithm: Option<String>,
    /// With --rewrap-key: wrap with a key the configuration does not pin.
    #[arg(long, requires = "rewrap_key")]
    pub allow_unpinned_key: bool,
    /// With --print-dm-crypt: machine-readable output (as `header dump --json`).
    #[arg(long, requires = "print_dm_crypt")]
    pub json: bool,
    /// Do not ask for confirmation (typing YES on the terminal).
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, Args)]
pub struct BenchmarkArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
}

#[derive(Debug, Args)]
pub struct OpenArgs {
    /// Encrypted block device or file.
    pub device: PathBuf,
    /// Name of the plaintext device (/dev/disk/by-kvcrypt/NAME).
    pub name: String,
    #[arg(long, value_enum, default_value_t = TransportKind::Auto)]
    pub transport: TransportKind,
    /// Hardware queues (ublk) / worker threads (FUSE); default one per CPU.
    #[arg(long)]
    pub queues: Option<u16>,
    /// Queue depth per queue.
    #[arg(long, default_value_t = 128)]
    pub queue_depth: u16,
    /// Pass discards through (reveals which blocks are in use).
    #[arg(long)]
    pub allow_discards: bool,
    /// Serve read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Stay in the foreground (serve until SIGTERM/SIGINT). Not access-checked: requires
    /// --no-access-checks.
    #[arg(long)]
    pub foreground: bool,
    /// Use a key the configuration does not pin (`keys` of `[vault]`), trusting the key ids
    /// on the disk for this command. Only for volumes whose disk you trust.
    #[arg(long)]
    pub allow_unpinned_key: bool,

    /// Serve without the running agent, so nobody re-checks access to the key: revoking it in
    /// Key Vault does NOT lock this volume (defeats revocation). Without this flag `open`
    /// hands the volume to the agent (kvcrypt-agent.service), which checks it periodically,
    /// and refuses when no agent runs.
    #[arg(long)]
    pub no_access_checks: bool,
}

#[derive(Debug, Args)]
pub struct CloseArgs {
    /// Name of the served volume (as given to `open`).
    pub name: String,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Run one unlock pass and exit (for tests and `ExecStartPre`-style checks).
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// The device that appeared (`/dev/sdb`, or a kernel name like `sdb`).
    pub device: PathBuf,
}

#[derive(Debug, Args)]
pub struct UdevNameArgs {
    /// Kernel name or path of a block device (`loop3`, `/dev/ublkb0`).
    pub device: PathBuf,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// Name of the volume served by the agent.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this volume.
    pub name: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to print completions for.
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory to write kvcrypt.1 and kvcrypt-SUBCOMMAND.1 into.
    #[arg(long, default_value = ".")]
    pub out_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    pub device: PathBuf,
    pub name: String,
    #[arg(long, value_enum, default_value_t = TransportKind::Auto)]
    pub transport: TransportKind,
    #[arg(long)]
    pub queues: Option<u16>,
    #[arg(long, default_value_t = 128)]
    pub queue_depth: u16,
    #[arg(long)]
    pub allow_discards: bool,
    #[arg(long)]
    pub read_only: bool,
    /// File descriptor to read the 64-byte volume key from (then closed).
    #[arg(long, default_value_t = 3)]
    pub key_fd: i32,
    /// File descriptor to write one readiness line to (device path), then closed.
    #[arg(long)]
    pub ready_fd: Option<i32>,
    /// Re-attach an existing ublk device (after a crash or suspend) instead of adding one.
    #[arg(long)]
    pub recover_dev_id: Option<u32>,
    /// FUSE: take over the connection of a dead worker, whose FUSE file this loop device is
    /// bound to, instead of mounting a new one (needs --fuse-init and --fuse-fds).
    #[arg(long, requires_all = ["fuse_init", "fuse_fds"])]
    pub fuse_recover: Option<PathBuf>,
    /// What INIT agreed on that connection (JSON, as in the dead worker's state file).
    #[arg(long)]
    pub fuse_init: Option<String>,
    /// How many /dev/fuse descriptors of that connection were passed, from fd 5 on.
    #[arg(long)]
    pub fuse_fds: Option<usize>,
}

fn parse_sector_size(s: &str) -> Result<u32, String> {
    match s {
        "4096" => Ok(4096),
        "512" => Ok(512),
        _ => Err(format!("sector size must be 4096 or 512, not {s}")),
    }
}

/// Entry point of the `kvcrypt` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs its state changes (info) by default; other commands only warnings.
    let daemon = matches!(cli.command, Command::Agent(_) | Command::Attach(_));
    init_logging(cli.verbose + u8::from(daemon));
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvcrypt: {e:#}");
            ExitCode::from(e.exit().code())
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KVCRYPT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Under systemd (stderr is the journal stream) log structured fields to journald.
    if crate::agent::logging::stderr_is_journal()
        && let Ok(layer) = tracing_journald::layer()
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(layer.with_syslog_identifier("kvcrypt".into()))
            .try_init();
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Not dumpable, no core files: used by every command that holds an unwrapped volume key.
/// (The worker hardens itself and fails if it cannot; here a failure is only logged.)
pub(crate) fn harden() {
    if let Err(e) = kvcrypt_crypto::secmem::harden_process() {
        tracing::warn!(error = %e, "cannot harden the process (dumpable / core limit)");
    }
}

fn dispatch(cli: Cli) -> Result<(), Failure> {
    let config = cli.config;
    if matches!(
        cli.command,
        Command::Format(_)
            | Command::Header(_)
            | Command::Rewrap(_)
            | Command::Recover(_)
            | Command::Open(_)
    ) {
        harden();
    }
    // Every process that takes a volume key first makes sure it can lock it in RAM.
    let holds_keys = match &cli.command {
        Command::Format(_)
        | Command::Rewrap(_)
        | Command::Recover(_)
        | Command::Open(_)
        | Command::Worker(_)
        | Command::Agent(_) => true,
        Command::Header(HeaderCmd::Dump(a)) => a.dump_master_key,
        _ => false,
    };
    if holds_keys {
        kvcrypt_crypto::secmem::check_key_memory()?;
    }
    match cli.command {
        Command::Format(a) => volume::format(&config, a),
        Command::Header(h) => volume::header(&config, h),
        Command::Probe(a) => volume::probe(a),
        Command::Rewrap(a) => volume::rewrap(&config, a),
        Command::Recover(a) => volume::recover(&config, a),
        Command::Benchmark(a) => volume::benchmark(a),
        Command::Open(a) => serve::open(&config, a),
        Command::Close(a) => serve::close(a),
        Command::Worker(a) => serve::worker(a),
        Command::Agent(a) => agentcmd::agent(&config, a),
        Command::Lock(a) => agentcmd::lock(a),
        Command::Unlock(a) => agentcmd::unlock(a),
        Command::Status(a) => agentcmd::status(a),
        Command::Completions(a) => docs::completions(a),
        Command::Man(a) => docs::man(a),
        Command::Attach(a) => agentcmd::attach(&config, a),
        Command::UdevName(a) => agentcmd::udev_name(a),
    }
}

/// Errors raised at the CLI edge itself.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Permission(String),
    #[error("{0}")]
    Unsupported(String),
}

impl ExitClass for CliError {
    fn exit_class(&self) -> Exit {
        match self {
            CliError::Usage(_) => Exit::Usage,
            CliError::Config(_) => Exit::Config,
            CliError::Busy(_) => Exit::Busy,
            CliError::InUse(_) => Exit::InUse,
            CliError::NotFound(_) => Exit::NotFound,
            CliError::Permission(_) => Exit::Permission,
            CliError::Unsupported(_) => Exit::Unsupported,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The exit code is the one of the typed error `?` converted, and context added on the
    /// way out keeps it (a context that fell back to the generic code would fail here: none of
    /// these classes is `Exit::Failure`).
    #[test]
    fn exit_codes_come_from_the_error_type_through_context() {
        use kvcrypt_exit::Context;
        let dir = tempfile::tempdir().unwrap();
        let zeros = dir.path().join("zeros.img");
        std::fs::write(&zeros, vec![0u8; 2 << 20]).unwrap();

        fn read(p: &std::path::Path) -> Result<(), Failure> {
            kvcrypt_header_io::read(p)?;
            Ok(())
        }
        let e = read(&zeros)
            .with_context(|| format!("opening {}", zeros.display()))
            .unwrap_err();
        assert!(matches!(
            e.error()
                .root_cause()
                .downcast_ref::<kvcrypt_format::HeaderError>(),
            Some(kvcrypt_format::HeaderError::NotKvcrypt { .. })
        ));
        assert_eq!(e.exit(), Exit::NotKvcrypt, "{e:#}");
        assert!(
            format!("{e:#}").starts_with(&format!("opening {}: ", zeros.display())),
            "{e:#}"
        );

        let tampered = || -> Result<(), Failure> {
            Err(kvcrypt_format::HeaderError::Tampered).context("key slot 0")?;
            Ok(())
        };
        let e = tampered().context("opening data").unwrap_err();
        assert_eq!(e.exit(), Exit::HeaderInvalid, "{e:#}");

        let missing = dir.path().join("missing");
        let e = std::fs::File::open(&missing)
            .with_context(|| format!("opening {}", missing.display()))
            .context("format")
            .unwrap_err();
        assert_eq!(e.exit(), Exit::NotFound, "{e:#}");

        // A CLI error keeps its class through a helper's context too.
        let e = Err::<(), _>(CliError::InUse("data is served".into()))
            .context("header restore")
            .unwrap_err();
        assert_eq!(e.exit(), Exit::InUse);
        assert_eq!(format!("{e:#}"), "header restore: data is served");
    }
}
