//! The kvcrypt block data path: the [`engine`] (AES-256-XTS per sector over a backing store,
//! suspend/resume with the key wiped) and the [`transport`]s that bring the kernel's block
//! requests to it (ublk over io_uring; FUSE file + loop device where ublk is missing).

pub mod engine;
pub mod target;
pub mod transport;
