//! Request mapping tests (no kernel needed): ublk opcodes, offsets in 512-byte units, bounds,
//! alignment, read-only and discard policy, on the blocking path (here) and the split-phase
//! async path (`split`). The kernel side is covered by tests/ublk_vm.rs.

use std::io;
use std::sync::Mutex;

use libublk::sys;

use super::request::{Geometry, handle_request};
use super::{UblkOptions, ublk_params};
use crate::target::BlockTarget;

mod engine;
mod split;

/// In-memory target that records what it was asked to do.
pub(super) struct MemTarget {
    data: Mutex<Vec<u8>>,
    sector: u32,
    log: Mutex<Vec<String>>,
    fail_with: Option<i32>,
}

impl MemTarget {
    fn new(size: usize, sector: u32) -> Self {
        Self {
            data: Mutex::new(vec![0; size]),
            sector,
            log: Mutex::new(Vec::new()),
            fail_with: None,
        }
    }
    fn note(&self, s: String) -> io::Result<()> {
        self.log.lock().unwrap().push(s);
        match self.fail_with {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Ok(()),
        }
    }
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl BlockTarget for MemTarget {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn sector_size(&self) -> u32 {
        self.sector
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        drop(d);
        self.note(format!("read {offset} {}", buf.len()))
    }
    fn write_at(&self, offset: u64, buf: &mut [u8], fua: bool) -> io::Result<()> {
        self.data.lock().unwrap()[offset as usize..offset as usize + buf.len()]
            .copy_from_slice(buf);
        self.note(format!("write {offset} {} fua={fua}", buf.len()))
    }
    fn flush(&self) -> io::Result<()> {
        self.note("flush".into())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.note(format!("discard {offset} {len}"))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.note(format!("zeroes {offset} {len}"))
    }
}

fn geo(t: &MemTarget) -> Geometry {
    Geometry {
        size: t.size(),
        sector_size: t.sector as u64,
        read_only: false,
        allow_discards: false,
    }
}

const MIB: usize = 1 << 20;

#[test]
fn write_then_read_round_trips_at_the_sector_offset() {
    let t = MemTarget::new(MIB, 4096);
    let g = geo(&t);
    let mut buf = vec![0u8; 64 * 1024];
    buf[..8192]
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 251) as u8);
    // start_sector is in 512-byte units: sector 16 = byte 8192.
    let r = handle_request(&t, &g, sys::UBLK_IO_OP_WRITE, 16, 16, &mut buf);
    assert_eq!(r, 8192);
    let stored = t.data.lock().unwrap()[8192..16384].to_vec();
    assert_eq!(
        stored,
        (0..8192).map(|i| (i % 251) as u8).collect::<Vec<_>>()
    );
    let mut back = vec![0xffu8; 64 * 1024];
    assert_eq!(
        handle_request(&t, &g, sys::UBLK_IO_OP_READ, 16, 16, &mut back),
        8192
    );
    assert_eq!(&back[..8192], &stored[..]);
    assert!(
        back[8192..].iter().all(|&b| b == 0xff),
        "bytes past the request untouched"
    );
    assert_eq!(t.log(), ["write 8192 8192 fua=false", "read 8192 8192"]);
}

#[test]
fn fua_flag_reaches_the_target_and_flush_maps_to_flush() {
    let t = MemTarget::new(MIB, 4096);
    let g = geo(&t);
    let mut buf = vec![7u8; 4096];
    let op = sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA;
    assert_eq!(handle_request(&t, &g, op, 0, 8, &mut buf), 4096);
    assert_eq!(
        handle_request(&t, &g, sys::UBLK_IO_OP_FLUSH, 0, 0, &mut buf),
        0
    );
    assert_eq!(t.log(), ["write 0 4096 fua=true", "flush"]);
}

#[test]
fn misaligned_out_of_range_and_oversized_requests_are_refused() {
    let t = MemTarget::new(MIB, 4096);
    let g = geo(&t);
    let mut buf = vec![0u8; 8192];
    // 512-byte aligned but not 4096-aligned.
    assert_eq!(
        handle_request(&t, &g, sys::UBLK_IO_OP_READ, 1, 8, &mut buf),
        -libc::EINVAL
    );
    assert_eq!(
        handle_request(&t, &g, sys::UBLK_IO_OP_READ, 0, 1, &mut buf),
        -libc::EINVAL
    );
    // Past the end of the device.
    let last = (MIB as u64 >> 9) - 8;
    assert_eq!(
        handle_request(&t, &g, sys::UBLK_IO_OP_READ, last, 16, &mut buf),
        -libc::EINVAL
    );
    assert_eq!(
        handle_request(&t, &g, sys::UBLK_IO_OP_READ, last, 8, &mut buf),
        4096
    );
    assert_eq!(
        handle_request(&t, &g, sys::UBLK_IO_OP_READ, u64::MAX >> 9, 8, &mut buf),
        -libc::EINVAL
    );
    // Larger than the request buffer.
    assert_eq!(
        handle_request(&t, &g, sys::UBLK_IO_OP_READ, 0, 32, &mut buf),
        -libc::EINVAL
    );
    assert_eq!(t.log(), [format!("read {} 4096", last << 9)]);
}

#[test]
fn read_only_refuses_writes_and_discards() {
    let t = MemTarget::new(MIB, 512);
    let g = Geometry {
        read_only: true,
        allow_discards: true,
        ..geo(&t)
    };
    let mut buf = vec![1u8; 512];
    assert_eq!(
        handle_request(&t, &g, sys::UBLK_IO_OP_WRITE, 3, 1, &mut buf),
        -libc::EROFS
    );
    assert_eq!(
        handle_request(&t, &g, sys::UBLK_IO_OP_DISCARD, 0, 8, &mut buf),
        -libc::EOPNOTSUPP
    );
    assert_eq!(
        handle_request(&t, &g, sys::UBLK_IO_OP_READ, 3, 1, &mut buf),
        512
    );
    assert!(t.data.lock().unwrap().iter().all(|&b| b == 0));
    assert_eq!(t.log(), ["read 1536 512"]);
}

#[test]
fn discards_only_when_allowed() {
    let t = MemTarget::new(MIB, 4096);
    let mut buf = vec![0u8; 4096];
    let off = geo(&t);
    assert_eq!(
        handle_request(&t, &off, sys::UBLK_IO_OP_DISCARD, 8, 16, &mut buf),
        -libc::EOPNOTSUPP
    );
    assert_eq!(
        handle_request(&t, &off, sys::UBLK_IO_OP_WRITE_ZEROES, 8, 16, &mut buf),
        -libc::EOPNOTSUPP
    );
    let on = Geometry {
        allow_discards: true,
        ..off
    };
    assert_eq!(
        handle_request(&t, &on, sys::UBLK_IO_OP_DISCARD, 8, 16, &mut buf),
        0
    );
    assert_eq!(
        handle_request(&t, &on, sys::UBLK_IO_OP_WRITE_ZEROES, 16, 8, &mut buf),
        0
    );
    assert_eq!(t.log(), ["discard 4096 8192", "zeroes 8192 4096"]);
    assert_eq!(
        handle_request(&t, &on, sys::UBLK_IO_OP_WRITE_SAME, 0, 8, &mut buf),
        -libc::EOPNOTSUPP
    );
}

#[test]
fn target_errors_become_negative_errno() {
    let mut t = MemTarget::new(MIB, 4096);
    t.fail_with = Some(libc::ENOSPC);
    let g = geo(&t);
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        handle_request(&t, &g, sys::UBLK_IO_OP_WRITE, 0, 8, &mut buf),
        -libc::ENOSPC
    );
    assert_eq!(
        handle_request(&t, &g, sys::UBLK_IO_OP_FLUSH, 0, 0, &mut buf),
        -libc::ENOSPC
    );
}

#[test]
fn params_use_the_sector_size_and_announce_flush_and_fua() {
    let opts = UblkOptions::default();
    let p = ublk_params(64 * MIB as u64, &opts, 12);
    assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC);
    assert_eq!(p.basic.logical_bs_shift, 12);
    assert_eq!(p.basic.physical_bs_shift, 12);
    assert_eq!(p.basic.dev_sectors, (64 * MIB as u64) >> 9);
    assert_eq!(p.basic.max_sectors, opts.max_io_bytes >> 9);
    assert_ne!(p.basic.attrs & sys::UBLK_ATTR_VOLATILE_CACHE, 0);
    assert_ne!(p.basic.attrs & sys::UBLK_ATTR_FUA, 0);
    assert_eq!(p.basic.attrs & sys::UBLK_ATTR_READ_ONLY, 0);

    let ro = UblkOptions {
        read_only: true,
        allow_discards: true,
        ..UblkOptions::default()
    };
    let p = ublk_params(MIB as u64, &ro, 9);
    assert_ne!(p.basic.attrs & sys::UBLK_ATTR_READ_ONLY, 0);
    assert_eq!(
        p.types & sys::UBLK_PARAM_TYPE_DISCARD,
        0,
        "no discard on a read-only device"
    );

    let dis = UblkOptions {
        allow_discards: true,
        ..UblkOptions::default()
    };
    let p = ublk_params(MIB as u64, &dis, 12);
    assert_ne!(p.types & sys::UBLK_PARAM_TYPE_DISCARD, 0);
    assert_eq!(p.discard.discard_granularity, 4096);
    assert_eq!(p.discard.max_discard_segments, 1);
}
