//! How the kernel sees the plaintext device: ublk or FUSE + loop. (Owned by the data-path work.)
