//! The body of `kvcrypt worker` (and of `kvcrypt open --foreground`): read the header, check the
//! key, serve the device over the chosen transport, publish state + control socket, then handle
//! control requests and termination signals until the volume is closed.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};

use super::protocol::{Answer, Request, ServeState, WorkerStatus};
use super::{
    BY_KVCRYPT_DIR, FuseTakeover, WorkerState, ensure_dirs, fdpass, fuse_dir, socket_path,
    state_path, sys, validate_name,
};
use kvcrypt_crypto::XtsCipher;
use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_datapath::engine::{Engine, EngineConfig};
use kvcrypt_datapath::transport::TransportKind;
use kvcrypt_datapath::transport::fuse::{FuseDevice, FuseInit, FuseOptions};
use kvcrypt_datapath::transport::ublk;
use kvcrypt_exit::{Context, Exit, Failure};
use kvcrypt_format::VolumeHeader;

/// What to serve (the `kvcrypt worker` arguments without descriptors).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub device: PathBuf,
    pub name: String,
    pub transport: TransportKind,
    /// ublk queues / FUSE serving threads.
    pub queues: Option<u16>,
    pub queue_depth: u16,
    pub allow_discards: bool,
    pub read_only: bool,
    pub recover_dev_id: Option<u32>,
    /// FUSE: serve a dead worker's connection in place instead of mounting a new one.
    pub fuse_takeover: Option<FuseTakeover>,
}

/// What the control op `fuse_fds` hands out: duplicates of the worker's /dev/fuse descriptors
/// and the INIT parameters, or why there are none to hand out.
type SharedFuse = Arc<Result<(Vec<OwnedFd>, FuseInit), String>>;

/// Called once the block device exists (the worker writes it to its ready fd).
pub type OnReady<'a> = Box<dyn FnOnce(&Path) + 'a>;

enum Event {
    Op {
        op: Request,
        key: Option<VolumeKey>,
        reply: Sender<Answer>,
        /// Signalled once the answer is on the socket (so `close` can answer before exiting).
        written: Receiver<()>,
    },
    Terminate(i32),
    /// The backing block device disappeared (see [`super::backing`]): close the device, as on
    /// SIGTERM; there is nothing left to serve from.
    BackingGone(String),
}

/// Serves the volume until it is closed (control `close`, or SIGTERM/SIGINT/SIGHUP).
pub fn run_worker(opts: &RunOptions, key: VolumeKey, on_ready: OnReady<'_>) -> Result<(), Failure> {
    validate_name(&opts.name)?;
    // Signals are taken synchronously by a dedicated thread; block them before any thread
    // starts so every thread inherits the mask.
    sys::block_termination_signals().context("blocking termination signals")?;
    let loaded = kvcrypt_header_io::read(&opts.device)?;
    loaded
        .verify_key(&key)
        .with_context(|| format!("checking the key of {}", opts.device.display()))?;
    let h: VolumeHeader = loaded.header.clone();
    let cipher = XtsCipher::new(&key);
    drop(key); // the expanded keys are all the data path needs
    ensure_dirs().context("creating /run/kvcrypt")?;

    let use_ublk = match opts.transport {
        TransportKind::Ublk => true,
        TransportKind::Fuse => false,
        TransportKind::Auto => kvcrypt_datapath::transport::auto_is_ublk(),
    };
    let mut cfg = EngineConfig::new(&opts.device, h.data_offset, h.data_length, h.sector_size);
    cfg.read_only = opts.read_only;
    cfg.allow_discards = opts.allow_discards;
    let engine = Arc::new(Engine::open(cfg, cipher)?);
    if use_ublk {
        serve_ublk(opts, &h, engine, on_ready)
    } else {
        serve_fuse(opts, &h, engine, on_ready)
    }
}

fn serve_fuse(
    opts: &RunOptions,
    h: &VolumeHeader,
    engine: Arc<Engine>,
    on_ready: OnReady<'_>,
) -> Result<(), Failure> {
    // The FUSE file is plaintext: mount it where only this process can see it, in a namespace
    // that pins no other filesystem (the same one a ublk worker serves from). Done before any
    // serving thread exists, so all of them live in the private namespace.
    // `NamespaceError` has no exit class of its own: the generic code, as before.
    kvcrypt_host::mountinfo::enter_worker_namespace(Some(&super::run_dir())).map_err(|e| {
        Failure::wrap(Exit::Failure, e)
            .context("creating a private mount namespace for the FUSE file")
    })?;
    let mut fopts = FuseOptions::new(&opts.name, fuse_dir().join(&opts.name));
    fopts.read_only = opts.read_only;
    if let Some(q) = opts.queues {
        fopts.threads = usize::from(q).max(1);
    }
    // In FUSE-over-io_uring mode the queues are fixed (one per CPU, the kernel's rule); the
    // depth is the ring entries per queue.
    fopts.uring_depth = Some(usize::from(opts.queue_depth).max(1));
    let mut dev = match &opts.fuse_takeover {
        Some(t) => {
            let fds = t
                .fds
                .iter()
                .map(|f| f.try_clone())
                .collect::<Result<Vec<_>, _>>()
                .context("duplicating the /dev/fuse descriptors")?;
            FuseDevice::recover(engine.clone(), &fopts, fds, t.init, &t.loop_dev)?
        }
        None => FuseDevice::start(engine.clone(), &fopts)?,
    };
    let bdev = dev
        .block_device()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let state = WorkerState {
        pid: std::process::id(),
        name: opts.name.clone(),
        device: opts.device.clone(),
        transport: TransportKind::Fuse.as_str().into(),
        block_device: bdev.clone(),
        ublk_dev_id: None,
        uuid: h.uuid.to_string(),
        read_only: opts.read_only,
        allow_discards: opts.allow_discards,
        fuse_mode: Some(dev.mode().as_str().to_string()),
        fuse: dev.init(),
    };
    let shared: SharedFuse = Arc::new(match dev.shared_fds() {
        Some((fds, init)) => fds
            .iter()
            .map(|f| f.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map(|v| (v, init))
            .map_err(|e| format!("duplicating the /dev/fuse descriptors: {e}")),
        None => Err(match dev.init().and_then(|i| i.why_not_recoverable()) {
            Some(why) => format!("no new worker could take this connection over: {why}"),
            None => "no new worker could take this connection over".into(),
        }),
    });
    let (tx, rx) = mpsc::channel();
    let listener = publish(&state, &tx, Some(shared))?;
    on_ready(&bdev);

    let result = fuse_loop(opts, h, &engine, &mut dev, &state, &rx);
    unpublish(&opts.name, listener, false);
    result
}

fn fuse_loop(
    opts: &RunOptions,
    h: &VolumeHeader,
    engine: &Arc<Engine>,
    dev: &mut FuseDevice,
    state: &WorkerState,
    rx: &Receiver<Event>,
) -> Result<(), Failure> {
    for ev in rx {
        match ev {
            Event::Terminate(_) | Event::BackingGone(_) => {
                match &ev {
                    Event::BackingGone(why) => {
                        tracing::error!(volume = %opts.name, "volume {}: {why}; closing its device", opts.name)
                    }
                    Event::Terminate(sig) => {
                        tracing::info!(volume = %opts.name, "volume {}: signal {sig}: closing", opts.name)
                    }
                    _ => {}
                }
                if dev.in_use() {
                    tracing::warn!(volume = %opts.name, "volume {}: closing {} while it is in use; further I/O on it fails", opts.name, state.block_device.display());
                }
                dev.close(true)?;
                return Ok(());
            }
            Event::Op {
                op,
                key,
                reply,
                written,
            } => {
                let answer = match op {
                    Request::Status => {
                        let mut st = status_of(state, engine);
                        st.resent = Some(dev.resent_requests());
                        Answer::status(st)
                    }
                    Request::Suspend => match engine.suspend() {
                        Ok(()) => Answer::ok(),
                        Err(e) => Answer::refused(e.to_string()),
                    },
                    Request::Resume => match key {
                        None => {
                            Answer::refused("resume needs the 64-byte key after the request line")
                        }
                        Some(k) => match h.verify_key(&k) {
                            Ok(()) => {
                                engine.resume(XtsCipher::new(&k));
                                Answer::ok()
                            }
                            Err(e) => Answer::refused(format!("key refused: {e}")),
                        },
                    },
                    Request::Close => {
                        if engine.is_suspended() {
                            Answer::busy(
                                "the volume is suspended; resume it first (or stop the worker with SIGTERM)",
                            )
                        } else {
                            match dev.close(false) {
                                Ok(()) => {
                                    let _ = reply.send(Answer::ok());
                                    let _ = written.recv_timeout(std::time::Duration::from_secs(2));
                                    return Ok(());
                                }
                                Err(e @ kvcrypt_datapath::transport::TransportError::Busy(_)) => {
                                    Answer::busy(e.to_string())
                                }
                                Err(e) => {
                                    let _ = reply.send(Answer::refused(e.to_string()));
                                    return Err(e.into());
                                }
                            }
                        }
                    }
                    // Answered on the connection's own thread (it carries descriptors).
                    Request::FuseFds => Answer::refused("fuse_fds is answered by the connection"),
                };
                let _ = reply.send(answer);
            }
        }
    }
    Ok(())
}

fn serve_ublk(
    opts: &RunOptions,
    h: &VolumeHeader,
    engine: Arc<Engine>,
    on_ready: OnReady<'_>,
) -> Result<(), Failure> {
    let uopts = ublk::UblkOptions {
        queues: opts.queues,
        depth: opts.queue_depth,
        read_only: opts.read_only,
        allow_discards: opts.allow_discards,
        volume_id: Some(h.uuid.to_string()),
        run_dir: Some(super::run_dir()),
        ..ublk::UblkOptions::default()
    };
    let (stop_h, stop_sig) = ublk::stop_channel();
    let (tx, rx) = mpsc::channel::<Event>();
    let mut listener = None;
    let mut published: Option<WorkerState> = None;
    // Control requests are answered by a helper thread: the main thread is inside serve().
    let pending: Arc<std::sync::Mutex<Option<Sender<Answer>>>> = Arc::default();
    let end = {
        let pending = pending.clone();
        let engine2 = engine.clone();
        let name = opts.name.clone();
        let on_ready_cell = std::cell::Cell::new(Some(on_ready));
        let tx2 = tx.clone();
        let rx_cell = std::cell::Cell::new(Some(rx));
        ublk::serve(
            engine.clone(),
            &uopts,
            opts.recover_dev_id,
            |bdev, dev_id| {
                let state = WorkerState {
                    pid: std::process::id(),
                    name: name.clone(),
                    device: opts.device.clone(),
                    transport: TransportKind::Ublk.as_str().into(),
                    block_device: bdev.to_path_buf(),
                    ublk_dev_id: Some(dev_id),
                    uuid: h.uuid.to_string(),
                    read_only: opts.read_only,
                    allow_discards: opts.allow_discards,
                    fuse_mode: None,
                    fuse: None,
                };
                match publish(&state, &tx2, None) {
                    Ok(l) => listener = Some(l),
                    Err(e) => tracing::error!("publishing the state of '{name}': {e:#}"),
                }
                if let Some(rx) = rx_cell.take() {
                    let st = state.clone();
                    let stop_h = stop_h.clone();
                    std::thread::spawn(move || ublk_control(rx, st, engine2, stop_h, pending));
                }
                published = Some(state);
                if let Some(f) = on_ready_cell.take() {
                    f(bdev);
                }
            },
            stop_sig,
        )
    };
    let end = end?;
    tracing::info!(volume = %opts.name, "volume {}: ublk serve ended: {end:?}", opts.name);
    if let Some(l) = listener {
        // Suspended (the device stays QUIESCED for a new worker): keep the state file, whose
        // ublk_dev_id (with this now dead pid) tells a restarted agent or `kvcrypt open` which
        // device to recover instead of adding a new one.
        let suspended = matches!(
            end,
            ublk::ServeEnd::Quiesced | ublk::ServeEnd::ExitToQuiesce
        );
        unpublish(&opts.name, l, suspended);
    }
    // Answer the request that ended serving (close / suspend), then leave.
    if let Some(reply) = pending.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = reply.send(Answer::ok());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(published);
    if end == ublk::ServeEnd::ExitToQuiesce {
        // Kernel without UBLK_F_QUIESCE: the device goes QUIESCED only when we exit; libublk's
        // teardown would hang, so leave now (the key dies with the process).
        ublk::exit_immediately(0);
    }
    Ok(())
}

fn ublk_control(
    rx: Receiver<Event>,
    state: WorkerState,
    engine: Arc<Engine>,
    stop: ublk::StopHandle,
    pending: Arc<std::sync::Mutex<Option<Sender<Answer>>>>,
) {
    for ev in rx {
        match ev {
            Event::Terminate(_) => {
                stop.request(ublk::StopRequest::Close);
            }
            Event::BackingGone(why) => {
                tracing::error!(volume = %state.name, "volume {}: {why}; closing {}", state.name, state.block_device.display());
                stop.request(ublk::StopRequest::Close);
            }
            Event::Op {
                op, reply, written, ..
            } => match op {
                Request::Status => {
                    let _ = reply.send(Answer::status(status_of(&state, &engine)));
                }
                // ublk: closing deletes the disk; refuse while a filesystem is mounted on it or
                // someone holds it open (SIGTERM still forces it).
                Request::Close if kvcrypt_host::inuse::device_in_use(&state.block_device) => {
                    let _ = reply.send(Answer::busy(format!(
                        "{} is in use (mounted or held open); unmount it first",
                        state.block_device.display()
                    )));
                }
                Request::Close | Request::Suspend => {
                    drop(written);
                    *pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(reply);
                    let req = if op == Request::Close {
                        ublk::StopRequest::Close
                    } else {
                        ublk::StopRequest::Detach
                    };
                    stop.request(req);
                }
                Request::Resume => {
                    let _ = reply.send(Answer::refused(
                        "ublk volumes resume by starting a new worker with --recover-dev-id",
                    ));
                }
                Request::FuseFds => {
                    let _ = reply.send(Answer::refused("not a FUSE worker"));
                }
            },
        }
    }
}

fn status_of(state: &WorkerState, engine: &Engine) -> WorkerStatus {
    WorkerStatus {
        name: state.name.clone(),
        pid: state.pid,
        state: if engine.is_suspended() {
            ServeState::Suspended
        } else {
            ServeState::Serving
        },
        transport: state.transport.clone(),
        device: state.device.clone(),
        block_device: state.block_device.clone(),
        parked: engine.parked_requests(),
        fuse_mode: state.fuse_mode.clone(),
        resent: None,
    }
}

/// Writes the state file, the /dev/disk/by-kvcrypt symlink and starts the control socket and
/// signal threads.
fn publish(
    state: &WorkerState,
    tx: &Sender<Event>,
    fuse: Option<SharedFuse>,
) -> Result<UnixListener, Failure> {
    let sp = state_path(&state.name);
    let tmp = sp.with_extension("json.tmp");
    // Serialising the plain state struct does not fail in practice; nothing to tell apart.
    let json = serde_json::to_vec_pretty(state).map_err(|e| Failure::wrap(Exit::Failure, e))?;
    std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, &sp)?;

    let sock = socket_path(&state.name);
    let _ = std::fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    let l2 = listener.try_clone()?;
    let tx2 = tx.clone();
    std::thread::Builder::new()
        .name("kvcrypt-control".into())
        .spawn(move || accept_loop(l2, tx2, fuse))?;
    let tx3 = tx.clone();
    std::thread::Builder::new()
        .name("kvcrypt-signals".into())
        .spawn(move || {
            let sig = sys::wait_termination();
            let _ = tx3.send(Event::Terminate(sig));
        })?;
    if let Some(disk) = super::backing::BackingDisk::identify(&state.device, Path::new("/sys")) {
        let tx4 = tx.clone();
        super::backing::watch(disk, move |why| {
            let _ = tx4.send(Event::BackingGone(why));
        });
    }
    // With udev the link is udev's (60-kvcrypt.rules): whoever started us waits for it
    // (`wait_until_named`), and a link made here would hide whether udev has processed the
    // device yet, i.e. whether systemd's device unit for it exists.
    if !super::udev_running()
        && let Err(e) = link_by_name(&state.name, &state.block_device)
    {
        tracing::warn!("cannot create {BY_KVCRYPT_DIR}/{}: {e}", state.name);
    }
    Ok(listener)
}

fn unpublish(name: &str, listener: UnixListener, keep_state: bool) {
    drop(listener);
    let _ = std::fs::remove_file(socket_path(name));
    if !keep_state {
        let _ = std::fs::remove_file(state_path(name));
    }
    let _ = std::fs::remove_file(super::log_path(name));
    unlink_by_name(name);
}

/// `/dev/disk/by-kvcrypt/NAME` → the block device (idempotent; udev may have made it already).
pub fn link_by_name(name: &str, bdev: &Path) -> std::io::Result<()> {
    link_in(Path::new(BY_KVCRYPT_DIR), name, bdev)
}

/// `dir/NAME` → `bdev`, replacing a link to anything else.
pub(super) fn link_in(dir: &Path, name: &str, bdev: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let link = dir.join(name);
    if std::fs::read_link(&link).is_ok_and(|t| t == bdev) {
        return Ok(());
    }
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(bdev, &link)
}

pub fn unlink_by_name(name: &str) {
    let _ = std::fs::remove_file(Path::new(BY_KVCRYPT_DIR).join(name));
}

fn accept_loop(listener: UnixListener, tx: Sender<Event>, fuse: Option<SharedFuse>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { break };
        let tx = tx.clone();
        let fuse = fuse.clone();
        std::thread::spawn(move || serve_conn(conn, tx, fuse));
    }
}

/// `{"op":"fuse_fds"}`: the answer line carries the /dev/fuse descriptors (SCM_RIGHTS), so the
/// agent can hold the connection open across this worker's death.
fn answer_fuse_fds(w: &UnixStream, fuse: Option<&SharedFuse>) -> std::io::Result<()> {
    let (fds, init) = match fuse.map(|f| f.as_ref()) {
        Some(Ok((fds, init))) if fds.len() <= fdpass::MAX_FDS_PER_MESSAGE => (fds, init),
        Some(Ok((fds, _))) => {
            let msg = format!(
                "{} /dev/fuse descriptors are more than one message can carry ({})",
                fds.len(),
                fdpass::MAX_FDS_PER_MESSAGE
            );
            return fdpass::send_with_fds(w, Answer::refused(msg).line().as_bytes(), &[])
                .map(|_| ());
        }
        Some(Err(why)) => {
            return fdpass::send_with_fds(w, Answer::refused(why.as_str()).line().as_bytes(), &[])
                .map(|_| ());
        }
        None => {
            let line = Answer::refused("not a FUSE worker").line();
            return fdpass::send_with_fds(w, line.as_bytes(), &[]).map(|_| ());
        }
    };
    let line = Answer::fuse_fds(fds.len(), *init).line();
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    fdpass::send_with_fds(w, line.as_bytes(), &borrowed).map(|_| ())
}

/// Longest request line accepted on the control socket (requests are a few dozen bytes).
const MAX_REQUEST_LINE: usize = 64 * 1024;

/// Reads one `\n`-terminated request line into `line` (without the newline) one byte at a
/// time, so nothing after the newline leaves the socket. Returns 0 at end of stream.
fn read_request_line(r: &mut impl Read, line: &mut Vec<u8>) -> std::io::Result<usize> {
    line.clear();
    let mut b = [0u8; 1];
    loop {
        if r.read(&mut b)? == 0 {
            return Ok(0);
        }
        if b[0] == b'\n' {
            return Ok(line.len() + 1);
        }
        if line.len() >= MAX_REQUEST_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "control request line too long",
            ));
        }
        line.push(b[0]);
    }
}

fn serve_conn(conn: UnixStream, tx: Sender<Event>, fuse: Option<SharedFuse>) {
    let allowed = sys::peer_uid(&conn).is_ok_and(|uid| uid == 0 || uid == sys::euid());
    let mut w = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    if !allowed {
        let _ = w.write_all(Answer::permission_denied().line().as_bytes());
        return;
    }
    // Unbuffered on purpose: the 64 key bytes that follow a `resume` line must go straight
    // from the socket into secret memory. A BufReader would read them ahead into its heap
    // buffer, which is freed without being wiped (a copy of the key left in ordinary memory).
    let mut r = conn;
    let mut line = Vec::new();
    loop {
        match read_request_line(&mut r, &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let op = match Request::parse(&line) {
            Ok(op) => op,
            Err(why) => {
                if w.write_all(Answer::refused(why).line().as_bytes()).is_err() {
                    return;
                }
                continue;
            }
        };
        if op == Request::FuseFds {
            if answer_fuse_fds(&w, fuse.as_ref()).is_err() {
                return;
            }
            continue;
        }
        let key = if op.carries_key() {
            let mut k = VolumeKey::zeroed();
            if r.read_exact(k.expose_mut()).is_err() {
                return;
            }
            Some(k)
        } else {
            None
        };
        let (rtx, rrx) = mpsc::channel();
        let (wtx, wrx) = mpsc::channel();
        if tx
            .send(Event::Op {
                op,
                key,
                reply: rtx,
                written: wrx,
            })
            .is_err()
        {
            return;
        }
        let answer = rrx
            .recv()
            .unwrap_or_else(|_| Answer::refused("the worker is exiting"));
        let sent = w
            .write_all(answer.line().as_bytes())
            .and_then(|()| w.flush());
        let _ = wtx.send(());
        if sent.is_err() {
            return;
        }
    }
}
