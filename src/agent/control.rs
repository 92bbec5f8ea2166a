//! The control socket `/run/kvcrypt/control.sock`: one JSON object per line each way.
//!
//! Root only, twice over: the directory is 0700 and the socket 0600, and the server checks the
//! peer's uid with SO_PEERCRED (so a socket exposed by a wrong mode or a bind mount still
//! refuses non-root callers with a clear message instead of obeying them).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;

use super::opened::{OPEN_TIMEOUT, OpenSpec};
use super::ports::{AccessClass, Platform};
use super::reload::OpenRefused;
use super::status::{VolumeState, VolumeStatus};
use super::volume::{CloseRefused, Command, VolumeHandle};

/// Directory of runtime state; `KVCRYPT_RUN_DIR` overrides it (tests, several agents).
pub fn run_dir() -> PathBuf {
    std::env::var_os("KVCRYPT_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/kvcrypt"))
}

pub fn socket_path() -> PathBuf {
    run_dir().join("control.sock")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Status {
        #[serde(default)]
        name: Option<String>,
    },
    Lock {
        name: String,
    },
    Unlock {
        name: String,
    },
    /// A block device appeared (udev): volumes waiting for a device retry now.
    Attach {
        device: String,
    },
    /// `kvcrypt close NAME` of a configured volume: closed, and kept closed until `unlock`.
    /// Of a runtime volume (`Open`): closed and forgotten.
    Close {
        name: String,
    },
    /// `kvcrypt open DEVICE NAME` with the agent running: the agent unwraps the key itself,
    /// serves the device and access-checks it like a configured volume (a runtime volume,
    /// recorded under the run directory until `kvcrypt close`).
    Open(OpenSpec),
}

/// What the control socket asks of the daemon's volume set (it owns the volume tasks).
#[derive(Debug)]
pub enum SetRequest {
    /// Adopt a runtime volume: record it and start its task.
    Open(OpenSpec, oneshot::Sender<Result<VolumeHandle, OpenRefused>>),
    /// Forget a runtime volume (closed, or its first unlock failed).
    Forget(String, oneshot::Sender<()>),
}

/// Error kinds a client maps to exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Permission,
    NotFound,
    Failed,
    BadRequest,
    /// Refused: the device is mounted, held open or suspended.
    Busy,
    /// Key Vault denied access to the volume's key.
    Denied,
    /// Key Vault unreachable or failing for now.
    Unavailable,
    /// Local setup is wrong (header, credentials, key id).
    Config,
    /// The header names no key the configuration pins for the volume.
    NotPinned,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeStatus>,
}

impl Response {
    fn ok(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            message: Some(message.into()),
            code: None,
            volumes: vec![],
        }
    }
    fn err(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            ok: false,
            message: Some(message.into()),
            code: Some(code),
            volumes: vec![],
        }
    }
}

/// The volumes a control server acts on.
pub struct Registry<P: Platform> {
    /// Follows reloads (volumes added, and forgotten once closed after removal).
    pub volumes: tokio::sync::watch::Receiver<BTreeMap<String, VolumeHandle>>,
    pub platform: Arc<P>,
    /// To the daemon's volume set (runtime volumes); `None`: `open` is refused.
    pub set: Option<tokio::sync::mpsc::Sender<SetRequest>>,
}

/// Creates the run directory (0700) and binds the socket (0600). Refuses to steal the socket
/// of an agent that is still answering.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "another kvcrypt agent is running (answering on {})",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Accepts connections until the task is dropped.
pub async fn serve<P: Platform>(listener: UnixListener, reg: Arc<Registry<P>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let reg = reg.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle_conn(stream, reg).await {
                        tracing::debug!(error = %e, "control connection ended with an error");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle_conn<P: Platform>(
    stream: UnixStream,
    reg: Arc<Registry<P>>,
) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (r, mut w) = stream.into_split();
    if uid != 0 {
        tracing::warn!(
            uid,
            "control socket: refused a connection from uid {uid} (root only)"
        );
        let resp = Response::err(
            ErrorCode::Permission,
            format!("permission denied: the kvcrypt agent only obeys root (caller uid {uid})"),
        );
        w.write_all(line(&resp).as_bytes()).await?;
        return Ok(());
    }
    let mut lines = tokio::io::BufReader::new(r).lines();
    while let Some(l) = lines.next_line().await? {
        if l.trim().is_empty() {
            continue;
        }
        let resp = match serde_json::from_str::<Request>(&l) {
            Ok(req) => handle(req, &reg).await,
            Err(e) => Response::err(ErrorCode::BadRequest, format!("bad request: {e}")),
        };
        w.write_all(line(&resp).as_bytes()).await?;
    }
    Ok(())
}

fn line(r: &Response) -> String {
    let mut s = serde_json::to_string(r).unwrap_or_else(|_| r#"{"ok":false}"#.to_owned());
    s.push('\n');
    s
}

async fn handle<P: Platform>(req: Request, reg: &Registry<P>) -> Response {
    // A snapshot: a reload meanwhile applies to the next request.
    let volumes = reg.volumes.borrow().clone();
    let find = |name: &str| {
        volumes.get(name).ok_or_else(|| {
            let known: Vec<&str> = volumes.keys().map(String::as_str).collect();
            Response::err(
                ErrorCode::NotFound,
                format!("no volume named {name:?} in the configuration (configured: {known:?})"),
            )
        })
    };
    match req {
        Request::Status { name } => {
            let handles: Vec<&VolumeHandle> = match &name {
                Some(n) => match find(n) {
                    Ok(h) => vec![h],
                    Err(r) => return r,
                },
                None => volumes.values().collect(),
            };
            let mut out = Vec::new();
            for h in handles {
                let mut st = h.status.borrow().clone();
                if matches!(st.state, VolumeState::Serving | VolumeState::Suspended)
                    && let Ok(Ok(v)) = tokio::time::timeout(
                        Duration::from_secs(2),
                        reg.platform.worker_status(&h.name),
                    )
                    .await
                {
                    st.worker = Some(v);
                }
                out.push(st);
            }
            Response {
                volumes: out,
                ..Response::ok("")
            }
        }
        Request::Lock { name } => match find(&name) {
            Ok(h) => ask(h, Command::Lock).await,
            Err(r) => r,
        },
        Request::Unlock { name } => match find(&name) {
            Ok(h) => ask(h, Command::Unlock).await,
            Err(r) => r,
        },
        Request::Close { name } => match find(&name) {
            Ok(h) => {
                let (tx, rx) = oneshot::channel();
                if h.tx.send(Command::Close(tx)).await.is_err() {
                    return Response::err(ErrorCode::Failed, "the volume task has stopped");
                }
                match rx.await {
                    Ok(Ok(m)) => {
                        let opened = h.status.borrow().opened;
                        if opened {
                            forget(reg, &name).await;
                        }
                        Response::ok(format!("{name}: {m}"))
                    }
                    Ok(Err(e)) => {
                        let code = match e {
                            CloseRefused::Busy(_) => ErrorCode::Busy,
                            CloseRefused::NotOpen(_) => ErrorCode::NotFound,
                            CloseRefused::Failed(_) => ErrorCode::Failed,
                        };
                        Response::err(code, format!("{name}: {e}"))
                    }
                    Err(_) => Response::err(ErrorCode::Failed, "the volume task has stopped"),
                }
            }
            Err(r) => r,
        },
        Request::Open(spec) => open(spec, reg).await,
        Request::Attach { device } => {
            tracing::info!(
                device,
                "attach requested for {device}: waking the volumes that wait for a device"
            );
            for h in volumes.values() {
                let _ = h.tx.send(Command::Wake).await;
            }
            Response::ok(format!(
                "{device}: volumes waiting for a device will retry now"
            ))
        }
    }
}

/// `Request::Open`: the volume set adopts the volume; the answer waits for its first unlock
/// (serving, or why not: then it is forgotten again, nothing left behind).
async fn open<P: Platform>(spec: OpenSpec, reg: &Registry<P>) -> Response {
    let name = spec.name.clone();
    if let Err(e) = crate::worker::validate_name(&name) {
        return Response::err(ErrorCode::BadRequest, e.to_string());
    }
    if !spec.device.is_absolute() {
        return Response::err(
            ErrorCode::BadRequest,
            format!(
                "{}: the device path must be absolute",
                spec.device.display()
            ),
        );
    }
    let Some(set) = &reg.set else {
        return Response::err(
            ErrorCode::Failed,
            "this agent does not take volumes from kvcrypt open",
        );
    };
    let (tx, rx) = oneshot::channel();
    if set.send(SetRequest::Open(spec, tx)).await.is_err() {
        return Response::err(ErrorCode::Failed, "the agent is stopping");
    }
    let h = match rx.await {
        Ok(Ok(h)) => h,
        Ok(Err(OpenRefused::Busy(m))) => return Response::err(ErrorCode::Busy, m),
        Ok(Err(OpenRefused::NotFound(m))) => return Response::err(ErrorCode::NotFound, m),
        Ok(Err(OpenRefused::Failed(m))) => return Response::err(ErrorCode::Failed, m),
        Err(_) => return Response::err(ErrorCode::Failed, "the agent is stopping"),
    };
    let mut st = h.status.clone();
    let first = tokio::time::timeout(
        OPEN_TIMEOUT,
        st.wait_for(|s| match s.state {
            VolumeState::Serving | VolumeState::Suspended => true,
            VolumeState::Locked | VolumeState::Removed => s.reason.is_some(),
            VolumeState::Unlocking => false,
        }),
    )
    .await
    .map(|r| r.map(|v| v.clone()));
    let got = match first {
        Ok(Ok(v)) => v,
        _ => {
            forget(reg, &name).await;
            return Response::err(
                ErrorCode::Unavailable,
                format!("{name}: not served within {OPEN_TIMEOUT:?}; given up"),
            );
        }
    };
    if matches!(got.state, VolumeState::Serving | VolumeState::Suspended) {
        tracing::info!(volume = %name, "volume {name}: opened by kvcrypt open; served and access-checked by the agent until kvcrypt close");
        return Response {
            volumes: vec![got],
            ..Response::ok(format!("{name}: {}", "opened"))
        };
    }
    forget(reg, &name).await;
    let (code, detail) = match &got.last_error {
        Some(e) => (
            match e.class {
                AccessClass::Denied => ErrorCode::Denied,
                AccessClass::Transient => ErrorCode::Unavailable,
                AccessClass::Misconfigured => ErrorCode::Config,
                AccessClass::NotPinned => ErrorCode::NotPinned,
            },
            format!(": {}", e.message),
        ),
        None => (ErrorCode::Failed, String::new()),
    };
    Response::err(
        code,
        format!(
            "{name}: {}{detail}",
            got.reason.unwrap_or_else(|| "not opened".into())
        ),
    )
}

async fn forget<P: Platform>(reg: &Registry<P>, name: &str) {
    if let Some(set) = &reg.set {
        let (tx, rx) = oneshot::channel();
        if set
            .send(SetRequest::Forget(name.to_owned(), tx))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }
}

async fn ask(
    h: &VolumeHandle,
    f: fn(oneshot::Sender<Result<String, String>>) -> Command,
) -> Response {
    let (tx, rx) = oneshot::channel();
    if h.tx.send(f(tx)).await.is_err() {
        return Response::err(ErrorCode::Failed, "the volume task has stopped");
    }
    match rx.await {
        Ok(Ok(m)) => Response::ok(format!("{}: {m}", h.name)),
        Ok(Err(m)) => Response::err(ErrorCode::Failed, format!("{}: {m}", h.name)),
        Err(_) => Response::err(ErrorCode::Failed, "the volume task has stopped"),
    }
}

/// Client-side failure, mapped to exit codes by the CLI.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "permission denied: the kvcrypt control socket {0} is root-only; run this command as root"
    )]
    Permission(PathBuf),
    #[error(
        "the kvcrypt agent is not running (no control socket at {0}); start kvcrypt-agent.service"
    )]
    NotRunning(PathBuf),
    #[error("talking to the kvcrypt agent at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
}

impl kvcrypt_exit::ExitClass for ClientError {
    fn exit_class(&self) -> kvcrypt_exit::Exit {
        use kvcrypt_exit::Exit;
        match self {
            ClientError::Permission(_) => Exit::Permission,
            ClientError::NotRunning(_) => Exit::NotFound,
            ClientError::Io { .. } => Exit::Failure,
            ClientError::Refused { code, .. } => match code {
                ErrorCode::Permission => Exit::Permission,
                ErrorCode::NotFound => Exit::NotFound,
                ErrorCode::BadRequest => Exit::Usage,
                ErrorCode::Failed => Exit::Failure,
                ErrorCode::Busy => Exit::Busy,
                ErrorCode::Denied => Exit::AccessDenied,
                ErrorCode::Unavailable => Exit::VaultUnavailable,
                ErrorCode::Config => Exit::Config,
                ErrorCode::NotPinned => Exit::NotPinned,
            },
        }
    }
}

/// Sends one request (blocking; for the CLI) and returns the successful response.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    use std::io::ErrorKind;
    let io = |source: std::io::Error| ClientError::Io {
        path: path.to_owned(),
        source,
    };
    let mut s = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            return Err(ClientError::Permission(path.to_owned()));
        }
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            return Err(ClientError::NotRunning(path.to_owned()));
        }
        Err(e) => return Err(io(e)),
    };
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut msg = serde_json::to_string(req).map_err(|e| io(std::io::Error::other(e)))?;
    msg.push('\n');
    // The server may already have refused us (non-root) and closed: read its answer anyway.
    let _ = s.write_all(msg.as_bytes());
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).map_err(io)?;
    let resp: Response = serde_json::from_str(reply.trim()).map_err(|e| {
        io(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("bad reply {reply:?}: {e}"),
        ))
    })?;
    if resp.ok {
        Ok(resp)
    } else {
        Err(ClientError::Refused {
            code: resp.code.unwrap_or(ErrorCode::Failed),
            message: resp.message.unwrap_or_else(|| "request failed".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_shape_is_stable() {
        let r: Request = serde_json::from_str(r#"{"op":"lock","name":"data"}"#).unwrap();
        assert_eq!(
            r,
            Request::Lock {
                name: "data".into()
            }
        );
        let r: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(r, Request::Status { name: None });
        assert_eq!(
            serde_json::to_string(&Request::Attach {
                device: "/dev/sdb".into()
            })
            .unwrap(),
            r#"{"op":"attach","device":"/dev/sdb"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"format"}"#).is_err());
        let r: Request = serde_json::from_str(
            r#"{"op":"open","name":"rt","device":"/dev/sdc","transport":"fuse","queue_depth":64}"#,
        )
        .unwrap();
        let Request::Open(spec) = r else {
            panic!("not an open request: {r:?}")
        };
        assert_eq!(spec.name, "rt");
        assert_eq!(spec.queue_depth, 64);
        assert!(!spec.read_only && spec.queues.is_none());
    }

    #[test]
    fn client_reports_missing_agent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("control.sock");
        let e = request(&p, &Request::Status { name: None }, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, ClientError::NotRunning(_)), "{e}");
        assert!(e.to_string().contains("not running"));
    }

    #[tokio::test]
    async fn bind_sets_modes_and_refuses_a_live_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run").join("control.sock");
        let l = bind(&p).unwrap();
        let mode = |q: &Path| std::fs::metadata(q).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(p.parent().unwrap()), 0o700);
        assert_eq!(mode(&p), 0o600);
        assert!(bind(&p).is_err(), "a live socket must not be stolen");
        drop(l);
        // A stale socket (agent killed) is replaced.
        bind(&p).unwrap();
    }
}
