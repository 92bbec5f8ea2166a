//! Client side of a worker's control socket ([`super::protocol`]): one request line, one
//! answer line each; `resume` is followed by the 64 raw key bytes on the same connection.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::protocol::{Answer, Request, WorkerStatus};
use super::{WorkerError, fdpass, socket_path, validate_name};
use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_datapath::transport::fuse::FuseInit;

/// A connection to one worker's control socket.
pub struct WorkerClient {
    name: String,
    reader: BufReader<UnixStream>,
}

impl std::fmt::Debug for WorkerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerClient")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl WorkerClient {
    /// Connects with generous timeouts (suspend waits for in-flight I/O, close for a flush).
    pub fn connect(name: &str) -> Result<WorkerClient, WorkerError> {
        Self::connect_timeout(name, Duration::from_secs(600))
    }

    /// Connects; every read and write on the connection gives up after `timeout` (the agent
    /// uses a short one so a hung worker cannot stall its volume task for long).
    pub fn connect_timeout(name: &str, timeout: Duration) -> Result<WorkerClient, WorkerError> {
        validate_name(name)?;
        let path = socket_path(name);
        let s = UnixStream::connect(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                WorkerError::NotOpen(name.to_string())
            }
            std::io::ErrorKind::PermissionDenied => WorkerError::Permission(name.to_string()),
            _ => WorkerError::Control {
                name: name.to_string(),
                source: e,
            },
        })?;
        let _ = s.set_read_timeout(Some(timeout));
        let _ = s.set_write_timeout(Some(timeout));
        Ok(WorkerClient {
            name: name.to_string(),
            reader: BufReader::new(s),
        })
    }

    fn request(&mut self, req: Request, key: Option<&VolumeKey>) -> Result<Answer, WorkerError> {
        let name = self.name.clone();
        let ctl = |source| WorkerError::Control {
            name: name.clone(),
            source,
        };
        let s = self.reader.get_mut();
        s.write_all(req.line().as_bytes()).map_err(ctl)?;
        if let Some(k) = key {
            s.write_all(k.expose()).map_err(ctl)?;
        }
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(ctl)?;
        if n == 0 {
            return Err(ctl(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the worker closed the connection",
            )));
        }
        let answer: Answer = serde_json::from_str(&line)
            .map_err(|e| ctl(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        self.accepted(answer)
    }

    /// The answer if it says ok, else the refusal as an error.
    fn accepted(&self, answer: Answer) -> Result<Answer, WorkerError> {
        if answer.ok {
            return Ok(answer);
        }
        if answer.permission {
            return Err(WorkerError::Permission(self.name.clone()));
        }
        Err(WorkerError::Refused {
            name: self.name.clone(),
            message: answer
                .error
                .unwrap_or_else(|| "request refused".to_string()),
            busy: answer.busy,
        })
    }

    pub fn status(&mut self) -> Result<WorkerStatus, WorkerError> {
        self.request(Request::Status, None)?.status.ok_or_else(|| {
            WorkerError::State(format!("'{}' answered status without one", self.name))
        })
    }

    /// Waits for in-flight I/O, flushes, wipes the key; new I/O waits until `resume`.
    pub fn suspend(&mut self) -> Result<(), WorkerError> {
        self.request(Request::Suspend, None).map(|_| ())
    }

    /// Hands the key back (it is checked against the volume header) and lets I/O continue.
    pub fn resume(&mut self, key: &VolumeKey) -> Result<(), WorkerError> {
        self.request(Request::Resume, Some(key)).map(|_| ())
    }

    /// Duplicates of the worker's /dev/fuse descriptors (the same open files) and what INIT
    /// agreed: whoever holds them keeps the FUSE connection alive if the worker dies, so a new
    /// worker can take it over in place. Refused for ublk, io_uring mode and kernels without
    /// FUSE_NOTIFY_RESEND.
    pub fn fuse_fds(&mut self) -> Result<(Vec<OwnedFd>, FuseInit), WorkerError> {
        let name = self.name.clone();
        let ctl = |source| WorkerError::Control {
            name: name.clone(),
            source,
        };
        if !self.reader.buffer().is_empty() {
            return Err(ctl(std::io::Error::other("unread data on the connection")));
        }
        let s = self.reader.get_mut();
        s.write_all(Request::FuseFds.line().as_bytes())
            .map_err(ctl)?;
        // The descriptors ride on the answer line's bytes: read it with recvmsg, not through
        // the buffered reader.
        let mut line = Vec::new();
        let mut fds = Vec::new();
        while !line.contains(&b'\n') {
            let mut buf = [0u8; 4096];
            let (n, got) =
                fdpass::recv_with_fds(&*s, &mut buf, fdpass::MAX_FDS_PER_MESSAGE).map_err(ctl)?;
            fds.extend(got);
            if n == 0 {
                return Err(ctl(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the worker closed the connection",
                )));
            }
            line.extend_from_slice(&buf[..n]);
        }
        let answer: Answer = serde_json::from_slice(&line)
            .map_err(|e| ctl(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let answer = self.accepted(answer)?;
        let init = answer.fuse.ok_or_else(|| {
            WorkerError::State(format!(
                "bad fuse_fds answer from '{name}': no INIT parameters"
            ))
        })?;
        let want = answer.count.unwrap_or(0);
        if fds.len() != want {
            return Err(WorkerError::State(format!(
                "'{name}' sent {} of {want} /dev/fuse descriptors",
                fds.len()
            )));
        }
        Ok((fds, init))
    }

    /// Flushes and removes the device; the worker exits. Refused while the device is in use.
    pub fn close(&mut self) -> Result<(), WorkerError> {
        self.request(Request::Close, None).map(|_| ())
    }
}
