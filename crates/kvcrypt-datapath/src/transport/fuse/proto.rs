//! The subset of the FUSE kernel ABI (`<linux/fuse.h>`, protocol 7.38) that a one-file
//! filesystem needs. Layouts are copied from the UAPI header; field names match it.

pub const FUSE_KERNEL_VERSION: u32 = 7;
pub const FUSE_KERNEL_MINOR_VERSION: u32 = 38;
pub const ROOT_ID: u64 = 1;

// Opcodes.
pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const INTERRUPT: u32 = 36;
pub const DESTROY: u32 = 38;
pub const BATCH_FORGET: u32 = 42;
pub const FALLOCATE: u32 = 43;

// INIT flags.
pub const FUSE_ASYNC_READ: u32 = 1 << 0;
pub const FUSE_BIG_WRITES: u32 = 1 << 5;
pub const FUSE_ASYNC_DIO: u32 = 1 << 15;
pub const FUSE_MAX_PAGES: u32 = 1 << 22;
pub const FUSE_INIT_EXT: u32 = 1 << 30;
/// `FUSE_OVER_IO_URING` (bit 41 of the 64-bit flags) as it appears in `flags2`.
pub const FUSE_OVER_IO_URING_FLAGS2: u32 = 1 << (41 - 32);
/// `FUSE_HAS_RESEND` (bit 39, protocol 7.40, Linux 6.9): offered by a kernel that understands
/// [`FUSE_NOTIFY_RESEND`] and marks resent requests with [`FUSE_UNIQUE_RESEND`].
pub const FUSE_HAS_RESEND_FLAGS2: u32 = 1 << (39 - 32);

/// Notification code (in `fuse_out_header.error`, with `unique` 0): the kernel moves every
/// request a server had read but not answered back to the pending queue (`fuse_resend()`).
pub const FUSE_NOTIFY_RESEND: i32 = 7;
/// Set in `unique` of a request the kernel sends a second time after [`FUSE_NOTIFY_RESEND`].
pub const FUSE_UNIQUE_RESEND: u64 = 1 << 63;

// FUSE-over-io_uring commands (`enum fuse_uring_cmd`, the SQE's `cmd_op`).
pub const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
pub const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;

// OPEN reply flags.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;

// SETATTR valid bits.
pub const FATTR_SIZE: u32 = 1 << 3;

/// `_IOR(229, 0, uint32_t)`
pub const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500;

/// Plain-old-data wire structs: every bit pattern is valid and there is no padding the
/// kernel could misread. Only types in this file implement it.
///
/// # Safety
/// Implementors must be `repr(C)`, contain only integer fields, and have no implicit padding.
pub unsafe trait Pod: Copy + Default {}

macro_rules! pod {
    ($($t:ty),*) => { $(
        // SAFETY: repr(C) structs of integers laid out without implicit padding (checked by the
        // size assertions below against the UAPI sizes).
        unsafe impl Pod for $t {}
    )* };
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub total_extlen: u16,
    pub padding: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct OutHeader {
    pub len: u32,
    pub error: i32,
    pub unique: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub flags2: u32,
    pub unused: [u32; 11],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct InitOut {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
    pub map_alignment: u16,
    pub flags2: u32,
    pub unused: [u32; 7],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct AttrOut {
    pub attr_valid: u64,
    pub attr_valid_nsec: u32,
    pub dummy: u32,
    pub attr: Attr,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SetattrIn {
    pub valid: u32,
    pub padding: u32,
    pub fh: u64,
    pub size: u64,
    pub lock_owner: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub unused4: u32,
    pub uid: u32,
    pub gid: u32,
    pub unused5: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenIn {
    pub flags: u32,
    pub open_flags: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOut {
    pub fh: u64,
    pub open_flags: u32,
    pub backing_id: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub read_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
    pub padding: u32,
}

/// Same layout as `fuse_write_in`.
pub type WriteIn = ReadIn;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOut {
    pub size: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct FallocateIn {
    pub fh: u64,
    pub offset: u64,
    pub length: u64,
    pub mode: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct StatfsOut {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
    pub padding: u32,
    pub spare: [u32; 6],
}

/// `struct fuse_uring_ent_in_out`: ring bookkeeping inside an entry's header buffer.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UringEntInOut {
    pub flags: u64,
    /// Identifies the request in COMMIT_AND_FETCH (the request's `unique`).
    pub commit_id: u64,
    /// Kernel → server: payload bytes of the request; server → kernel: payload bytes of the reply.
    pub payload_sz: u32,
    pub padding: u32,
    pub reserved: u64,
}

/// `struct fuse_uring_req_header`: the header buffer (iovec 0) of one ring entry. `in_out`
/// holds `fuse_in_header` (request) / `fuse_out_header` (reply); `op_in` the opcode's first
/// argument (e.g. `fuse_read_in`); all other arguments and reply data live in the payload.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct UringReqHeader {
    pub in_out: [u8; 128],
    pub op_in: [u8; 128],
    pub ent: UringEntInOut,
}

impl Default for UringReqHeader {
    fn default() -> Self {
        UringReqHeader {
            in_out: [0; 128],
            op_in: [0; 128],
            ent: UringEntInOut::default(),
        }
    }
}

/// `struct fuse_uring_cmd_req`: the first 24 bytes of the SQE's 80-byte command area.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UringCmdReq {
    pub flags: u64,
    pub commit_id: u64,
    pub qid: u16,
    pub padding: [u8; 6],
}

pod!(
    UringEntInOut,
    UringReqHeader,
    UringCmdReq,
    InHeader,
    OutHeader,
    InitIn,
    InitOut,
    Attr,
    AttrOut,
    SetattrIn,
    OpenIn,
    OpenOut,
    ReadIn,
    WriteOut,
    FallocateIn,
    StatfsOut
);

const _: () = {
    assert!(size_of::<InHeader>() == 40);
    assert!(size_of::<OutHeader>() == 16);
    assert!(size_of::<InitIn>() == 64);
    assert!(size_of::<InitOut>() == 64);
    assert!(size_of::<Attr>() == 88);
    assert!(size_of::<AttrOut>() == 104);
    assert!(size_of::<SetattrIn>() == 88);
    assert!(size_of::<OpenOut>() == 16);
    assert!(size_of::<ReadIn>() == 40);
    assert!(size_of::<WriteOut>() == 8);
    assert!(size_of::<FallocateIn>() == 32);
    assert!(size_of::<StatfsOut>() == 80);
    assert!(size_of::<UringEntInOut>() == 32);
    assert!(size_of::<UringReqHeader>() == 288);
    assert!(size_of::<UringCmdReq>() == 24);
};

/// Reads a wire struct from the start of `b` (zero-filled if `b` is shorter: older kernels
/// send shorter versions of some structs).
pub fn read<T: Pod>(b: &[u8]) -> T {
    let mut t = T::default();
    let n = b.len().min(size_of::<T>());
    // SAFETY: T is Pod (any byte pattern is valid); we copy at most size_of::<T>() bytes from
    // a slice of at least n bytes into t.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut t as *mut T).cast::<u8>(), n) };
    t
}

/// The bytes of a wire struct.
pub fn bytes<T: Pod>(t: &T) -> &[u8] {
    // SAFETY: T is Pod without padding, so all size_of::<T>() bytes are initialised.
    unsafe { std::slice::from_raw_parts((t as *const T).cast::<u8>(), size_of::<T>()) }
}
