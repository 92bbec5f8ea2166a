//! Development tool: serve an AES-XTS-encrypted file as /dev/ublkbN with kvcrypt's ublk transport,
//! without a volume header or Key Vault (key and geometry from the command line). Used by the VM
//! harness to exercise the transport on its own; `kvcrypt open --transport ublk` is the product.
//!
//!   ublk_file_server FILE KEYFILE [--sector-size 4096] [--queues N] [--depth N]
//!                    [--recover-dev-id N] [--ready-file PATH]
//!
//!   ublk_file_server --state ID      (prints the kernel state of /dev/ublkbID and its server pid)
//!
//! KEYFILE holds the raw 64-byte XTS key. The data area is the whole FILE. SIGTERM/SIGINT close
//! (stop + delete the device); SIGUSR1 detaches (suspend: the device stays QUIESCED for
//! `--recover-dev-id`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use kvcrypt_crypto::XtsCipher;
use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_datapath::target::{BlockTarget, SplitStep};
use kvcrypt_datapath::transport::ublk::{self, ServeEnd, StopRequest, UblkOptions};

/// pread/pwrite + XTS: just enough target to drive the transport.
struct XtsFile {
    file: File,
    size: u64,
    sector: u32,
    cipher: XtsCipher,
}

fn crypto_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

impl BlockTarget for XtsFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn sector_size(&self) -> u32 {
        self.sector
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)?;
        let ss = self.sector as usize;
        self.cipher
            .decrypt_sectors(buf, offset / ss as u64, ss)
            .map_err(crypto_err)
    }
    fn write_at(&self, offset: u64, buf: &mut [u8], fua: bool) -> io::Result<()> {
        let ss = self.sector as usize;
        self.cipher
            .encrypt_sectors(buf, offset / ss as u64, ss)
            .map_err(crypto_err)?;
        self.file.write_all_at(buf, offset)?;
        if fua { self.file.sync_data() } else { Ok(()) }
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let ss = self.sector as usize;
        let mut chunk = vec![0u8; 64 * 1024];
        let mut pos = offset;
        while pos < offset + len {
            let n = ((offset + len - pos) as usize).min(chunk.len());
            chunk[..n].fill(0);
            self.cipher
                .encrypt_sectors(&mut chunk[..n], pos / ss as u64, ss)
                .map_err(crypto_err)?;
            self.file.write_all_at(&chunk[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
    // Split-phase: the transport's queues read/write the file on their own rings and call
    // only these for mapping and crypto (all tags of a queue in flight at once).
    fn backing_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
    fn backing_offset(&self, offset: u64, len: u64, _write: bool) -> Result<u64, i32> {
        let ss = u64::from(self.sector);
        let in_range = offset.checked_add(len).is_some_and(|end| end <= self.size);
        if in_range && offset.is_multiple_of(ss) && len.is_multiple_of(ss) {
            Ok(offset)
        } else {
            Err(libc::EINVAL)
        }
    }
    fn encrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), SplitStep> {
        let ss = self.sector as usize;
        self.cipher
            .encrypt_sectors(buf, offset / ss as u64, ss)
            .map_err(|_| SplitStep::Errno(libc::EIO))
    }
    fn decrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), SplitStep> {
        let ss = self.sector as usize;
        self.cipher
            .decrypt_sectors(buf, offset / ss as u64, ss)
            .map_err(|_| SplitStep::Errno(libc::EIO))
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KVCRYPT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    if std::env::args().nth(1).as_deref() == Some("--state") {
        // ublk_file_server --state ID: print LIVE / QUIESCED / ... and the serving pid.
        let id: u32 = std::env::args()
            .nth(2)
            .context("--state needs a device id")?
            .parse()?;
        match ublk::device_state(id) {
            Some((state, pid)) => println!("{state} {pid}"),
            None => println!("ABSENT 0"),
        }
        return Ok(());
    }
    let (Some(path), Some(keyfile)) = (args.next(), args.next()) else {
        bail!(
            "usage: ublk_file_server FILE KEYFILE [--sector-size N] [--queues N] [--depth N] [--recover-dev-id N] [--ready-file PATH]"
        );
    };
    let mut opts = UblkOptions::default();
    let (mut sector, mut recover, mut ready_file) = (4096u32, None, None::<PathBuf>);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--sector-size" => sector = val()?.parse()?,
            "--queues" => opts.queues = Some(val()?.parse()?),
            "--depth" => opts.depth = val()?.parse()?,
            "--recover-dev-id" => recover = Some(val()?.parse()?),
            "--ready-file" => ready_file = Some(val()?.into()),
            other => bail!("unknown option {other}"),
        }
    }
    // The server serves from a private mount namespace that keeps only /dev, /proc, /sys, /run
    // and its run directory: the ready file's directory is ours, so it must stay visible.
    opts.run_dir = ready_file
        .as_ref()
        .and_then(|p| p.parent())
        .map(PathBuf::from);
    let key_bytes = std::fs::read(&keyfile).with_context(|| format!("reading {keyfile}"))?;
    let key = VolumeKey::from_slice(&key_bytes).context("key file must hold exactly 64 bytes")?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {path}"))?;
    let size = file.metadata()?.len() / sector as u64 * sector as u64;
    let target = Arc::new(XtsFile {
        file,
        size,
        sector,
        cipher: XtsCipher::new(&key),
    });
    drop(key);

    let (handle, stop) = ublk::stop_channel();
    // Signals are turned into stop requests on a small tokio runtime (never in queue threads).
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT");
            let mut usr1 = signal(SignalKind::user_defined1()).expect("SIGUSR1");
            let req = tokio::select! {
                _ = term.recv() => StopRequest::Close,
                _ = int.recv() => StopRequest::Close,
                _ = usr1.recv() => StopRequest::Detach,
            };
            handle.request(req);
        });
    });
    let end = ublk::serve(
        target.clone(),
        &opts,
        recover,
        |dev, id| {
            println!("{} {id}", dev.display());
            if let Some(p) = &ready_file {
                let _ = std::fs::write(p, format!("{} {id}\n", dev.display()));
            }
        },
        stop,
    )?;
    eprintln!("ublk_file_server: {end:?}");
    if end == ServeEnd::ExitToQuiesce {
        drop(target); // queue threads still hold references; the key dies with the process
        ublk::exit_immediately(0);
    }
    Ok(())
}
