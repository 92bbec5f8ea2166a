//! Memory scanner of tests/memscan.rs: reads every readable mapping of a process through
//! `/proc/PID/mem` and counts copies of a volume master key in every form a leak would take
//! (raw bytes, hex, the four base64 flavours, and any 32 consecutive raw bytes of it).
//!
//! Pages the kernel refuses to read are skipped and counted: `memfd_secret` pages (the point of
//! them: EIO/EFAULT through /proc/PID/mem), `[vvar]`, device mappings. Any other error (EPERM,
//! the process gone) fails the scan, so an unreadable process can never look clean.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::FileExt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

/// Length of the partial copies looked for: half of the 64-byte key, one XTS sub-key (and the
/// first two AES-256 round keys of an expanded key schedule are exactly that).
pub const WINDOW: usize = 32;
const CHUNK: usize = 1 << 20;
const PAGE: u64 = 4096;

/// The forms a copy of the key is looked for in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Raw,
    HexLower,
    HexUpper,
    Base64,
    Base64NoPad,
    Base64Url,
    Base64UrlNoPad,
    /// Any 32-byte window of the raw key; counted as distinct copies (a run of consecutive key
    /// bytes at one place counts once, whatever its length ≥ 32, so a full raw copy counts here
    /// too).
    Window32,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Raw,
        Kind::HexLower,
        Kind::HexUpper,
        Kind::Base64,
        Kind::Base64NoPad,
        Kind::Base64Url,
        Kind::Base64UrlNoPad,
        Kind::Window32,
    ];

    /// Column heading in the report.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::HexLower => "hex",
            Kind::HexUpper => "HEX",
            Kind::Base64 => "b64",
            Kind::Base64NoPad => "b64-np",
            Kind::Base64Url => "b64url",
            Kind::Base64UrlNoPad => "b64url-np",
            Kind::Window32 => "win32",
        }
    }
}

/// One byte string to look for.
struct Needle {
    kind: Kind,
    bytes: Vec<u8>,
    /// For [`Kind::Window32`]: where the window starts in the key (to find the copy's start).
    key_offset: usize,
}

/// Every encoding of one key, indexed by their first two bytes so a scan is one pass over
/// memory with a table lookup per byte.
pub struct Needles {
    needles: Vec<Needle>,
    by_prefix: Vec<Vec<usize>>,
    longest: usize,
}

impl Needles {
    pub fn for_key(key: &[u8]) -> Needles {
        assert!(key.len() >= WINDOW, "a key of at least {WINDOW} bytes");
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let mut needles = vec![
            (Kind::Raw, key.to_vec()),
            (Kind::HexLower, hex.clone().into_bytes()),
            (Kind::HexUpper, hex.to_ascii_uppercase().into_bytes()),
            (Kind::Base64, STANDARD.encode(key).into_bytes()),
            (Kind::Base64NoPad, STANDARD_NO_PAD.encode(key).into_bytes()),
            (Kind::Base64Url, URL_SAFE.encode(key).into_bytes()),
            (
                Kind::Base64UrlNoPad,
                URL_SAFE_NO_PAD.encode(key).into_bytes(),
            ),
        ]
        .into_iter()
        .map(|(kind, bytes)| Needle {
            kind,
            bytes,
            key_offset: 0,
        })
        .collect::<Vec<_>>();
        needles.extend((0..=key.len() - WINDOW).map(|o| Needle {
            kind: Kind::Window32,
            bytes: key[o..o + WINDOW].to_vec(),
            key_offset: o,
        }));
        let mut by_prefix = vec![Vec::new(); 1 << 16];
        for (i, n) in needles.iter().enumerate() {
            by_prefix[prefix(&n.bytes, 0)].push(i);
        }
        let longest = needles.iter().map(|n| n.bytes.len()).max().unwrap_or(0);
        Needles {
            needles,
            by_prefix,
            longest,
        }
    }
}

fn prefix(b: &[u8], i: usize) -> usize {
    usize::from(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// What one scan of one process found.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub pid: u32,
    /// Bytes actually read and searched.
    pub bytes_read: u64,
    /// Bytes of readable-looking mappings the kernel refused (memfd_secret, [vvar], …).
    pub bytes_refused: u64,
    /// Names of the mappings with refused pages (`/secretmem (deleted)` is the key's).
    pub refused: BTreeSet<String>,
    pub hits: BTreeMap<Kind, usize>,
    /// Where the hits are: (kind, mapping name) → count, to say which buffer leaks.
    pub places: BTreeMap<(Kind, String), usize>,
}

impl Report {
    pub fn count(&self, k: Kind) -> usize {
        self.hits.get(&k).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.hits.values().sum()
    }

    /// "b64url×3 in [heap], win32×1 in anon@7f…" — empty when clean.
    pub fn places_text(&self) -> String {
        let mut s = String::new();
        for ((k, place), n) in &self.places {
            if !s.is_empty() {
                s.push_str(", ");
            }
            let _ = write!(s, "{}×{n} in {place}", k.label());
        }
        s
    }
}

/// A readable mapping from /proc/PID/maps.
#[derive(Debug)]
struct Mapping {
    start: u64,
    end: u64,
    /// Path, `[heap]`, `[stack]`, … or `anon@START` for anonymous memory.
    name: String,
}

fn readable_mappings(pid: u32) -> std::io::Result<Vec<Mapping>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with('r') {
            continue;
        }
        let (a, b) = range.split_once('-').expect("maps range");
        let start = u64::from_str_radix(a, 16).expect("maps start");
        let end = u64::from_str_radix(b, 16).expect("maps end");
        // offset, dev, inode, then the (optional) path, which may contain spaces.
        let name = f.skip(3).collect::<Vec<_>>().join(" ");
        let name = if name.is_empty() {
            format!("anon@{start:x}")
        } else {
            name
        };
        out.push(Mapping { start, end, name });
    }
    Ok(out)
}

/// Scans every readable mapping of `pid`. Errors (other than pages the kernel refuses) are
/// returned: a process that cannot be read must fail the test, not pass it.
pub fn scan_process(pid: u32, needles: &Needles) -> Result<Report, String> {
    let maps = readable_mappings(pid).map_err(|e| format!("/proc/{pid}/maps: {e}"))?;
    let mem =
        File::open(format!("/proc/{pid}/mem")).map_err(|e| format!("/proc/{pid}/mem: {e}"))?;
    let mut r = Report {
        pid,
        ..Default::default()
    };
    let mut anchors: HashSet<u64> = HashSet::new();
    let mut buf = vec![0u8; CHUNK];
    for m in &maps {
        if std::env::var_os("KVCRYPT_MEMSCAN_DEBUG").is_some() && m.name == "[stack]" {
            eprintln!(
                "memscan debug: pid {pid} [stack] {:#x}-{:#x}",
                m.start, m.end
            );
        }
        scan_mapping(&mem, m, needles, &mut buf, &mut r, &mut anchors).map_err(|e| {
            format!(
                "reading {} of pid {pid} ({:x}-{:x}): {e}",
                m.name, m.start, m.end
            )
        })?;
    }
    Ok(r)
}

/// Reads one mapping in chunks; consecutive readable chunks are searched with an overlap (the
/// `carry`) so a copy that straddles two chunks is still found, and counted once.
fn scan_mapping(
    mem: &File,
    m: &Mapping,
    needles: &Needles,
    buf: &mut [u8],
    r: &mut Report,
    anchors: &mut HashSet<u64>,
) -> std::io::Result<()> {
    let mut carry: Vec<u8> = Vec::new();
    let mut pos = m.start;
    while pos < m.end {
        let want = (m.end - pos).min(buf.len() as u64) as usize;
        match mem.read_at(&mut buf[..want], pos) {
            Ok(n) if n > 0 => {
                r.bytes_read += n as u64;
                let mut joined = std::mem::take(&mut carry);
                let carried = joined.len();
                joined.extend_from_slice(&buf[..n]);
                let base = pos - carried as u64;
                search(&joined, carried, base, &m.name, needles, r, anchors);
                let keep = joined.len().min(needles.longest - 1);
                carry = joined[joined.len() - keep..].to_vec();
                pos += n as u64;
            }
            // A page the kernel will not give us (secret memory, [vvar], a hole): skip just that
            // page; the next one may read again. A copy cannot straddle it, so drop the carry.
            Ok(_) => skip_page(&mut pos, &mut carry, r, m),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EFAULT)) => {
                skip_page(&mut pos, &mut carry, r, m)
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn skip_page(pos: &mut u64, carry: &mut Vec<u8>, r: &mut Report, m: &Mapping) {
    r.refused.insert(place_name(&m.name));
    let next = (*pos / PAGE + 1) * PAGE;
    r.bytes_refused += next - *pos;
    *pos = next;
    carry.clear();
}

/// Counts the needles found in `hay` (whose first `carried` bytes were searched already, with
/// the previous chunk: only matches reaching past them are new). `base` is `hay[0]`'s address.
fn search(
    hay: &[u8],
    carried: usize,
    base: u64,
    place: &str,
    needles: &Needles,
    r: &mut Report,
    anchors: &mut HashSet<u64>,
) {
    if hay.len() < 2 {
        return;
    }
    for i in 0..hay.len() - 1 {
        for &ni in &needles.by_prefix[prefix(hay, i)] {
            let n = &needles.needles[ni];
            let end = i + n.bytes.len();
            if end <= carried || end > hay.len() || hay[i..end] != n.bytes[..] {
                continue;
            }
            if n.kind == Kind::Window32 {
                // All windows of one contiguous copy share the copy's start address.
                let copy_start = base + i as u64 - n.key_offset as u64;
                if !anchors.insert(copy_start) {
                    continue;
                }
            }
            if std::env::var_os("KVCRYPT_MEMSCAN_DEBUG").is_some() {
                eprintln!(
                    "memscan debug: {:?} at {:#x} in {place} (key offset {})",
                    n.kind,
                    base + i as u64,
                    n.key_offset
                );
            }
            *r.hits.entry(n.kind).or_default() += 1;
            *r.places.entry((n.kind, place_name(place))).or_default() += 1;
        }
    }
}

/// Anonymous mappings are named by address, which says nothing across runs: group them.
fn place_name(name: &str) -> String {
    if name.starts_with("anon@") {
        "anonymous memory".into()
    } else {
        name.into()
    }
}

/// `pid` and every process below it (from the parent pids in /proc/*/stat), e.g. helpers the
/// agent or `kvcrypt open` started that also see the key.
pub fn with_descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // "PID (COMM) STATE PPID …": COMM may contain spaces and parentheses, so parse after
        // the last ')'.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        parent_of.push((p, ppid));
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            parent_of
                .iter()
                .filter(|&&(_, pp)| pp == parent)
                .map(|&(p, _)| p),
        );
        i += 1;
    }
    out
}

/// The process's command name (for the report).
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}
