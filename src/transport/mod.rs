//! How the kernel sees the plaintext device: ublk (primary) or FUSE + loop (fallback).
//! (Owned by the data-path work; the ublk transport lives in `ublk`.)

pub mod ublk;
