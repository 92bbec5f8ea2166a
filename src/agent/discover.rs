//! Finding the device a `[[volume]]` selector names: a path directly, a UUID through udev's
//! /dev/disk/by-uuid link when our udev rule made one, else by probing block devices.

use std::path::{Path, PathBuf};

use super::config::Selector;

/// Identity read from a kvcrypt header (what `kvcrypt probe` prints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uuid: uuid::Uuid,
    pub label: String,
}

/// Does `id` match the selector?
pub fn matches(sel: &Selector, id: &Identity) -> bool {
    match sel {
        Selector::Uuid(u) => *u == id.uuid,
        Selector::Label(l) => *l == id.label,
        Selector::Path(_) => false,
    }
}

/// Block devices worth probing: every /sys/class/block entry except our own served devices
/// (probing a suspended one would block), other ublk devices, empty loop devices, optical
/// and floppy drives (reading them loads media) and zero-sized devices.
pub fn candidates(sys_block: &Path, run_dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(sys_block) else {
        return vec![];
    };
    let served = served_devices(run_dir);
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if served.contains(&name)
            || name.starts_with("ublkb")
            || name.starts_with("sr")
            || name.starts_with("fd")
            || name.starts_with("ram")
            || name.starts_with("zram")
        {
            continue;
        }
        let dir = e.path();
        let size = std::fs::read_to_string(dir.join("size"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if size == 0 {
            continue;
        }
        if name.starts_with("loop")
            && let Ok(b) = std::fs::read_to_string(dir.join("loop/backing_file"))
            && Path::new(b.trim()).starts_with(run_dir)
        {
            continue;
        }
        out.push(PathBuf::from("/dev").join(&name));
    }
    out.sort();
    out
}

/// Kernel names of the plaintext devices that the workers' state files (`RUN/volumes/*.json`)
/// name, live or dead. The loop device of a FUSE worker that died is still held for a new
/// worker (I/O on it waits), and its backing file no longer shows under the run directory (the
/// FUSE mount lived in the dead worker's namespace): probing it would block — seen in the
/// system test, where that probe held up the worker's replacement for 30 s.
fn served_devices(run_dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(run_dir.join("volumes")) else {
        return vec![];
    };
    rd.flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter_map(|v| {
            let bd = v.get("block_device")?.as_str()?;
            Some(Path::new(bd).file_name()?.to_string_lossy().into_owned())
        })
        .collect()
}

/// Finds the device for `sel`. `probe` reads a kvcrypt identity (None for anything else); it
/// may block, so callers run this off the async runtime.
pub fn locate(
    sel: &Selector,
    run_dir: &Path,
    probe: &dyn Fn(&Path) -> Option<Identity>,
) -> Option<PathBuf> {
    match sel {
        Selector::Path(p) => p.exists().then(|| p.clone()),
        Selector::Uuid(u) => {
            let link = Path::new("/dev/disk/by-uuid").join(u.to_string());
            if link.exists()
                && let Ok(real) = link.canonicalize()
                && probe(&real).is_some_and(|id| matches(sel, &id))
            {
                return Some(real);
            }
            scan(sel, run_dir, probe)
        }
        Selector::Label(_) => scan(sel, run_dir, probe),
    }
}

fn scan(
    sel: &Selector,
    run_dir: &Path,
    probe: &dyn Fn(&Path) -> Option<Identity>,
) -> Option<PathBuf> {
    candidates(Path::new("/sys/class/block"), run_dir)
        .into_iter()
        .find(|d| probe(d).is_some_and(|id| matches(sel, &id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_matching() {
        let id = Identity {
            uuid: uuid::Uuid::from_u128(5),
            label: "data".into(),
        };
        assert!(matches(&Selector::Uuid(uuid::Uuid::from_u128(5)), &id));
        assert!(!matches(&Selector::Uuid(uuid::Uuid::from_u128(6)), &id));
        assert!(matches(&Selector::Label("data".into()), &id));
        assert!(!matches(&Selector::Label("dat".into()), &id));
    }

    #[test]
    fn candidates_skip_own_and_empty_devices() {
        let d = tempfile::tempdir().unwrap();
        let mk = |name: &str, size: &str, backing: Option<&str>| {
            let p = d.path().join(name);
            std::fs::create_dir_all(p.join("loop")).unwrap();
            std::fs::write(p.join("size"), size).unwrap();
            if let Some(b) = backing {
                std::fs::write(p.join("loop/backing_file"), b).unwrap();
            }
        };
        mk("sda", "2048\n", None);
        mk("loop0", "0\n", None);
        mk(
            "loop1",
            "4096\n",
            Some(&format!(
                "{}/fuse/data/image\n",
                d.path().join("run").display()
            )),
        );
        mk("loop2", "4096\n", Some("/var/tmp/disk.img\n"));
        mk("ublkb0", "4096\n", None);
        mk("sr0", "4096\n", None);
        // A dead FUSE worker's loop device: its backing file shows outside the run directory.
        mk("loop3", "4096\n", Some("/\n"));
        let run = d.path().join("run");
        std::fs::create_dir_all(run.join("volumes")).unwrap();
        std::fs::write(
            run.join("volumes/data.json"),
            r#"{"pid":1,"name":"data","block_device":"/dev/loop3"}"#,
        )
        .unwrap();
        let c = candidates(d.path(), &run);
        assert_eq!(
            c,
            vec![PathBuf::from("/dev/loop2"), PathBuf::from("/dev/sda")]
        );
    }

    #[test]
    fn path_selector_needs_existing_path() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("img");
        let never = |_: &Path| -> Option<Identity> { None };
        assert_eq!(locate(&Selector::Path(f.clone()), d.path(), &never), None);
        std::fs::write(&f, b"x").unwrap();
        assert_eq!(
            locate(&Selector::Path(f.clone()), d.path(), &never),
            Some(f)
        );
    }
}
