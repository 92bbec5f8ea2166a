//! The control protocol of a worker's socket (`/run/kvcrypt/volumes/NAME.sock`), one set of
//! types for both ends: the worker serves it (`run.rs`), the agent and `kvcrypt close` speak
//! it (`client.rs`). One JSON line per request, one JSON line per answer. `resume` is followed
//! on the same connection by the 64 raw key bytes, which the worker reads unbuffered straight
//! into secret memory: key bytes are never part of a JSON value.

use std::path::PathBuf;

use kvcrypt_datapath::transport::fuse::FuseInit;
use serde::{Deserialize, Serialize};

/// What a client asks of a worker. On the wire: `{"op":"status"}` and so on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The worker's [`WorkerStatus`].
    Status,
    /// Wait for in-flight I/O, flush, wipe the key; new I/O waits until `Resume`.
    Suspend,
    /// The 64 key bytes follow the line; checked against the header, then I/O continues.
    Resume,
    /// Flush and remove the device; refused while it is in use or suspended.
    Close,
    /// Duplicates of the /dev/fuse descriptors, carried by the answer line (SCM_RIGHTS).
    FuseFds,
}

impl Request {
    /// The request line, newline included.
    pub fn line(self) -> String {
        let op = match self {
            Request::Status => "status",
            Request::Suspend => "suspend",
            Request::Resume => "resume",
            Request::Close => "close",
            Request::FuseFds => "fuse_fds",
        };
        format!("{{\"op\":\"{op}\"}}\n")
    }

    /// Parses a request line (without its newline). The error is the answer to send.
    pub fn parse(line: &[u8]) -> Result<Request, String> {
        serde_json::from_slice(line).map_err(|_| {
            let op = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(str::to_string));
            match op {
                Some(op) => format!("unknown op '{op}'"),
                None => "not a control request (expected a JSON line like {\"op\":\"status\"})"
                    .to_string(),
            }
        })
    }

    /// Whether the key follows the request line.
    pub fn carries_key(self) -> bool {
        self == Request::Resume
    }
}

/// The answer to every request: success, or a refusal with its reason. A `status` answer also
/// carries the [`WorkerStatus`] fields, a `fuse_fds` answer `count` and `fuse`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Refused because the device is in use (mounted, held open) or suspended.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub busy: bool,
    /// Refused because the peer is not root (or the worker's own user).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub permission: bool,
    /// `fuse_fds`: how many descriptors came with the line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    /// `fuse_fds`: what the FUSE INIT agreed, for the worker that takes the connection over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuse: Option<FuseInit>,
    /// `status`: the worker's state (its fields sit next to `ok` on the wire).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub status: Option<WorkerStatus>,
}

impl Answer {
    pub fn ok() -> Answer {
        Answer {
            ok: true,
            ..Answer::default()
        }
    }

    pub fn refused(error: impl Into<String>) -> Answer {
        Answer {
            error: Some(error.into()),
            ..Answer::default()
        }
    }

    /// Refused because the device is in use or suspended (the client's exit code says "busy").
    pub fn busy(error: impl Into<String>) -> Answer {
        Answer {
            busy: true,
            ..Answer::refused(error)
        }
    }

    pub fn permission_denied() -> Answer {
        Answer {
            permission: true,
            ..Answer::refused("root only")
        }
    }

    pub fn status(status: WorkerStatus) -> Answer {
        Answer {
            status: Some(status),
            ..Answer::ok()
        }
    }

    pub fn fuse_fds(count: usize, init: FuseInit) -> Answer {
        Answer {
            count: Some(count),
            fuse: Some(init),
            ..Answer::ok()
        }
    }

    /// The answer line, newline included.
    pub fn line(&self) -> String {
        match serde_json::to_string(self) {
            Ok(s) => s + "\n",
            // Only a map with non-string keys could fail; none of these fields is one.
            Err(e) => format!(
                "{{\"ok\":false,\"error\":{}}}\n",
                serde_json::Value::String(format!("answer not encodable: {e}"))
            ),
        }
    }
}

/// Whether the worker's key is in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServeState {
    Serving,
    /// The key is wiped; I/O waits (FUSE) or the device is QUIESCED (ublk).
    Suspended,
}

/// The answer to [`Request::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub name: String,
    pub pid: u32,
    pub state: ServeState,
    /// "ublk" or "fuse".
    pub transport: String,
    pub device: PathBuf,
    pub block_device: PathBuf,
    /// Requests waiting for resume.
    pub parked: usize,
    /// FUSE transport only: "io_uring" or "dev_fuse".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuse_mode: Option<String>,
    /// FUSE transport only: requests the kernel sent again after an in-place takeover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resent: Option<u64>,
}

impl WorkerStatus {
    pub fn is_suspended(&self) -> bool {
        self.state == ServeState::Suspended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> WorkerStatus {
        WorkerStatus {
            name: "data".into(),
            pid: 42,
            state: ServeState::Suspended,
            transport: "fuse".into(),
            device: "/dev/sdb".into(),
            block_device: "/dev/loop0".into(),
            parked: 3,
            fuse_mode: Some("dev_fuse".into()),
            resent: Some(1),
        }
    }

    #[test]
    fn requests_are_the_lines_the_protocol_always_had() {
        for (r, line) in [
            (Request::Status, "{\"op\":\"status\"}\n"),
            (Request::Suspend, "{\"op\":\"suspend\"}\n"),
            (Request::Resume, "{\"op\":\"resume\"}\n"),
            (Request::Close, "{\"op\":\"close\"}\n"),
            (Request::FuseFds, "{\"op\":\"fuse_fds\"}\n"),
        ] {
            assert_eq!(r.line(), line);
            assert_eq!(Request::parse(line.trim_end().as_bytes()), Ok(r));
        }
        assert_eq!(
            Request::parse(b"{\"op\":\"reboot\"}"),
            Err("unknown op 'reboot'".to_string())
        );
        assert!(
            Request::parse(b"hello")
                .unwrap_err()
                .contains("not a control request")
        );
        assert!(Request::Resume.carries_key());
        assert!(!Request::Status.carries_key());
    }

    #[test]
    fn answers_round_trip_and_keep_their_wire_shape() {
        let a = Answer::status(status());
        let line = a.line();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["state"], "suspended");
        assert_eq!(v["parked"], 3);
        assert!(v.get("error").is_none() && v.get("busy").is_none());
        assert_eq!(serde_json::from_str::<Answer>(&line).unwrap(), a);

        let b = Answer::busy("in use");
        let v: serde_json::Value = serde_json::from_str(&b.line()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ok": false, "error": "in use", "busy": true})
        );
        let back: Answer = serde_json::from_str(&b.line()).unwrap();
        assert_eq!(back.status, None);
        assert_eq!(back, b);

        let p: Answer = serde_json::from_str(&Answer::permission_denied().line()).unwrap();
        assert!(p.permission && !p.ok);
        assert_eq!(
            serde_json::from_str::<Answer>("{\"ok\":true}\n").unwrap(),
            Answer::ok()
        );
    }
}
