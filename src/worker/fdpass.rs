//! Passing open files between processes with `SCM_RIGHTS`: a FUSE worker hands its `/dev/fuse`
//! descriptors to the agent, and the agent hands them to systemd's file descriptor store.
//! The receiver gets new descriptors for the *same* open files (not new opens), which is what
//! keeps a FUSE connection alive after its server died (see `transport::fuse`).
//!
//! Over rustix's safe `sendmsg`/`recvmsg` wrappers: std's `SocketAncillary` is still unstable.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix,
};

/// Descriptors per message: the kernel refuses more than `SCM_MAX_FD` (253) in one.
pub const MAX_FDS_PER_MESSAGE: usize = 253;

fn control_space(n: usize) -> Vec<MaybeUninit<u8>> {
    vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(n.max(1)))]
}

fn too_many(n: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{n} descriptors in one message (at most {MAX_FDS_PER_MESSAGE})"),
    )
}

/// Runs `send` with a control buffer carrying `fds` as one SCM_RIGHTS message.
fn with_rights(
    fds: &[BorrowedFd<'_>],
    send: impl FnOnce(&mut SendAncillaryBuffer<'_, '_, '_>) -> rustix::io::Result<usize>,
) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(too_many(fds.len()));
    }
    let mut space = control_space(fds.len());
    let mut ctl = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !ctl.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("control buffer too small"));
    }
    Ok(send(&mut ctl)?)
}

/// Sends `data` with `fds` attached on a connected socket.
pub fn send_with_fds(sock: impl AsFd, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    with_rights(fds, |ctl| {
        rustix::net::sendmsg(sock, &[IoSlice::new(data)], ctl, SendFlags::NOSIGNAL)
    })
}

/// Sends one datagram `data` with `fds` attached to `addr` (sd_notify's `FDSTORE=1`).
pub fn send_to_with_fds(
    sock: impl AsFd,
    addr: &SocketAddrUnix,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    with_rights(fds, |ctl| {
        rustix::net::sendmsg_addr(sock, addr, &[IoSlice::new(data)], ctl, SendFlags::NOSIGNAL)
    })
}

/// Receives into `buf`, taking up to `max_fds` attached descriptors (close-on-exec). Returns
/// the byte count (0: end of stream) and the descriptors.
pub fn recv_with_fds(
    sock: impl AsFd,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = control_space(max_fds);
    let mut ctl = RecvAncillaryBuffer::new(&mut space);
    let r = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut ctl,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for m in ctl.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = m {
            fds.extend(it);
        }
    }
    if r.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(io::Error::other(
            "descriptors were dropped (control message truncated)",
        ));
    }
    Ok((r.bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_receiver_gets_the_same_open_file() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"0123456789").unwrap();
        f.seek(std::io::SeekFrom::Start(4)).unwrap();
        send_with_fds(&a, b"x\n", &[f.as_fd()]).unwrap();
        let mut buf = [0u8; 8];
        let (n, fds) = recv_with_fds(&b, &mut buf, 4).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"x\n"[..], 1));
        // A duplicate of the same open file shares its offset (a new open would not).
        let mut g = std::fs::File::from(fds.into_iter().next().unwrap());
        let mut rest = String::new();
        g.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "456789");
        assert!(send_with_fds(&a, b"x", &vec![f.as_fd(); 254]).is_err());
    }
}
