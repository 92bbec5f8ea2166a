//! Re-implements docs/FORMAT.md §2–4 from the document alone (raw bytes, serde_json, HMAC) and
//! checks it against what kvcrypt writes: the document is enough for a second implementation.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use kvcrypt_testkit::MIB;
use kvcrypt_testkit::keys::{header_key as key, slot};
use kvcrypt_testkit::volume::*;
use sha2::{Digest, Sha256};

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// HKDF-SHA256 with L = 32: one expand block.
fn hkdf32(salt: &[u8], ikm: &[u8], info: &[u8]) -> [u8; 32] {
    let prk = hmac(salt, &[ikm]);
    hmac(&prk, &[info, &[1]])
}

fn lp(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn u32le(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64le(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}
fn text(b: &[u8]) -> &str {
    let end = b.iter().position(|&c| c == 0).unwrap();
    std::str::from_utf8(&b[..end]).unwrap()
}

#[test]
fn document_reproduces_checksum_key_check_and_mac() {
    let dir = tempfile::tempdir().unwrap();
    let vmk = key(1);
    let p = sized_file(dir.path(), "v.img", 8 * MIB);
    let mut h = kvcrypt_format::VolumeHeader::new_for_device(8 * MIB, 512, "doc ✓", &vmk).unwrap();
    h.add_slot(slot(1));
    // Slot 2 carries an access check (format v2); slot 1 is as a v1 volume's slot was.
    let mut s2 = slot(2);
    s2.check = Some(vec![0xa5; 40]);
    h.add_slot(s2);
    h.seal(&vmk);
    kvcrypt_header_io::write(&p, &mut h).unwrap();

    for (copy, index) in [(PRIMARY, 0u16), (SECONDARY, 1u16)] {
        let block = read_at(&p, copy, 4096);
        assert_eq!(
            &block[0..8],
            &[0x4b, 0x56, 0x43, 0x52, 0x59, 0x50, 0x54, 0xba]
        );
        assert_eq!(u16::from_le_bytes([block[8], block[9]]), 2);
        assert_eq!(u16::from_le_bytes([block[10], block[11]]), index);
        assert_eq!(u32le(&block, 12), 4096);
        assert_eq!(u64le(&block, 16), h.sequence);
        assert_eq!(&block[24..40], h.uuid.as_bytes());
        assert_eq!(text(&block[40..88]), "doc ✓");
        assert_eq!(text(&block[88..120]), "aes-xts-plain64");
        assert_eq!(u32le(&block, 120), 512);
        assert_eq!(u32le(&block, 124), 512);
        assert_eq!(u64le(&block, 128), MIB);
        assert_eq!(u64le(&block, 136), 7 * MIB);
        assert_eq!(
            (u64le(&block, 144), u64le(&block, 152), u64le(&block, 160)),
            (0, 524288, 524288)
        );
        assert!(block[176..224].iter().all(|&b| b == 0));
        assert!(block[256..].iter().all(|&b| b == 0));
        let md_len = u64le(&block, 168) as usize;
        let md = read_at(&p, copy + 4096, md_len);
        // The rest of the metadata area is zero.
        assert!(
            read_at(&p, copy + 4096 + md_len as u64, 520192 - md_len)
                .iter()
                .all(|&b| b == 0)
        );

        // §2.2 checksum.
        let mut zeroed = block.clone();
        zeroed[224..256].fill(0);
        let sum: [u8; 32] = Sha256::new()
            .chain_update(&zeroed)
            .chain_update(&md)
            .finalize()
            .into();
        assert_eq!(&block[224..256], &sum);

        // §2.3 JSON.
        let j: serde_json::Value = serde_json::from_slice(&md).unwrap();
        let obj = j.as_object().unwrap();
        assert_eq!(
            obj.keys().map(String::as_str).collect::<Vec<_>>(),
            vec!["access_check", "key_check", "keyslots", "mac"]
        );
        assert_eq!(j["access_check"]["algorithm"], "hkdf-sha256/hmac-sha256");
        assert_eq!(j["key_check"]["algorithm"], "hkdf-sha256/hmac-sha256");
        assert_eq!(j["mac"]["algorithm"], "hmac-sha256");
        let slots = j["keyslots"].as_array().unwrap();
        assert_eq!(slots.len(), 2);

        // §3 key check.
        let k_check = hkdf32(b"kvcrypt-v1-kdf", vmk.expose(), b"kvcrypt v1 key-check key");
        let key_check = hmac(&k_check, &[b"kvcrypt v1 key check"]);
        assert_eq!(
            B64.decode(j["key_check"]["value"].as_str().unwrap())
                .unwrap(),
            key_check
        );

        // §3.1 access check.
        let secret = hkdf32(
            b"kvcrypt-v1-kdf",
            vmk.expose(),
            b"kvcrypt v2 access-check secret",
        );
        let access_check = hmac(&secret, &[b"kvcrypt v2 access check"]);
        assert_eq!(
            B64.decode(j["access_check"]["value"].as_str().unwrap())
                .unwrap(),
            access_check
        );
        assert!(slots[0].get("check").is_none());
        assert_eq!(
            B64.decode(slots[1]["check"].as_str().unwrap()).unwrap(),
            vec![0xa5; 40]
        );

        // §4 MAC over the canonical input.
        let mut input = b"kvcrypt-header-mac-v1".to_vec();
        input.extend_from_slice(&2u16.to_le_bytes());
        input.extend_from_slice(&block[24..40]);
        lp(&mut input, text(&block[40..88]).as_bytes());
        lp(&mut input, text(&block[88..120]).as_bytes());
        input.extend_from_slice(&block[120..124]);
        input.extend_from_slice(&block[124..128]);
        input.extend_from_slice(&block[128..136]);
        input.extend_from_slice(&block[136..144]);
        input.extend_from_slice(&key_check);
        input.extend_from_slice(&access_check);
        input.extend_from_slice(&(slots.len() as u32).to_le_bytes());
        for s in slots {
            input.extend_from_slice(&(s["id"].as_u64().unwrap() as u32).to_le_bytes());
            lp(&mut input, s["provider"].as_str().unwrap().as_bytes());
            lp(&mut input, s["key_id"].as_str().unwrap().as_bytes());
            lp(&mut input, s["algorithm"].as_str().unwrap().as_bytes());
            lp(
                &mut input,
                &B64.decode(s["wrapped"].as_str().unwrap()).unwrap(),
            );
            lp(&mut input, s["created_at"].as_str().unwrap().as_bytes());
            let check = s
                .get("check")
                .map(|c| B64.decode(c.as_str().unwrap()).unwrap())
                .unwrap_or_default();
            lp(&mut input, &check);
        }
        let k_mac = hkdf32(
            b"kvcrypt-v1-kdf",
            vmk.expose(),
            b"kvcrypt v1 header-mac key",
        );
        let mac = hmac(&k_mac, &[&input]);
        assert_eq!(
            B64.decode(j["mac"]["value"].as_str().unwrap()).unwrap(),
            mac
        );
    }
}

/// docs/FORMAT.md §3.2 and §4 for a v3 header: version 3 in the block and the MAC input, the
/// recovery slot's exact members, and `lp(check)` of length 0 for it.
#[test]
fn document_reproduces_a_v3_header_with_its_recovery_slot() {
    let dir = tempfile::tempdir().unwrap();
    let vmk = key(3);
    let p = sized_file(dir.path(), "v3.img", 8 * MIB);
    let mut h = kvcrypt_format::VolumeHeader::new_for_device(8 * MIB, 4096, "v3", &vmk).unwrap();
    let mut s0 = slot(1);
    s0.check = Some(vec![0x11; 40]);
    h.add_slot(s0);
    h.add_slot(kvcrypt_format::KeySlot {
        id: 0,
        provider: "recovery-rsa".into(),
        key_id: format!("sha256:{}", "0f".repeat(32)),
        algorithm: "RSA-OAEP-256".into(),
        wrapped: vec![0x77; 512],
        created_at: "2026-11-29T08:30:00Z".into(),
        check: None,
        share: None,
    });
    h.seal(&vmk);
    kvcrypt_header_io::write(&p, &mut h).unwrap();

    let block = read_at(&p, PRIMARY, 4096);
    assert_eq!(u16::from_le_bytes([block[8], block[9]]), 3);
    let md = read_at(&p, PRIMARY + 4096, u64le(&block, 168) as usize);
    let j: serde_json::Value = serde_json::from_slice(&md).unwrap();
    let slots = j["keyslots"].as_array().unwrap();
    let r = slots[1].as_object().unwrap();
    assert_eq!(
        r.keys().map(String::as_str).collect::<Vec<_>>(),
        vec![
            "algorithm",
            "created_at",
            "id",
            "key_id",
            "provider",
            "wrapped"
        ]
    );
    assert_eq!(r["provider"], "recovery-rsa");

    let key_check = hmac(
        &hkdf32(b"kvcrypt-v1-kdf", vmk.expose(), b"kvcrypt v1 key-check key"),
        &[b"kvcrypt v1 key check"],
    );
    let access_check = hmac(
        &hkdf32(
            b"kvcrypt-v1-kdf",
            vmk.expose(),
            b"kvcrypt v2 access-check secret",
        ),
        &[b"kvcrypt v2 access check"],
    );
    let mut input = b"kvcrypt-header-mac-v1".to_vec();
    input.extend_from_slice(&3u16.to_le_bytes());
    input.extend_from_slice(&block[24..40]);
    lp(&mut input, text(&block[40..88]).as_bytes());
    lp(&mut input, text(&block[88..120]).as_bytes());
    input.extend_from_slice(&block[120..144]);
    input.extend_from_slice(&key_check);
    input.extend_from_slice(&access_check);
    input.extend_from_slice(&(slots.len() as u32).to_le_bytes());
    for s in slots {
        input.extend_from_slice(&(s["id"].as_u64().unwrap() as u32).to_le_bytes());
        for m in ["provider", "key_id", "algorithm"] {
            lp(&mut input, s[m].as_str().unwrap().as_bytes());
        }
        lp(
            &mut input,
            &B64.decode(s["wrapped"].as_str().unwrap()).unwrap(),
        );
        lp(&mut input, s["created_at"].as_str().unwrap().as_bytes());
        let check = s
            .get("check")
            .map(|c| B64.decode(c.as_str().unwrap()).unwrap())
            .unwrap_or_default();
        lp(&mut input, &check);
    }
    let k_mac = hkdf32(
        b"kvcrypt-v1-kdf",
        vmk.expose(),
        b"kvcrypt v1 header-mac key",
    );
    assert_eq!(
        B64.decode(j["mac"]["value"].as_str().unwrap()).unwrap(),
        hmac(&k_mac, &[&input])
    );
}

/// docs/FORMAT.md §3.3 and §4 for a v4 (split policy) header: version 4 in the block and the
/// MAC input, the `policy` member and each slot's `share` exactly as documented, the policy
/// bytes after `access_check` and each slot's share byte after `lp(check)` in the MAC input,
/// and — §3.3's Shamir rules, re-implemented here — the shares combine to the VMK.
#[test]
fn document_reproduces_a_v4_split_header() {
    let dir = tempfile::tempdir().unwrap();
    let vmk = key(4);
    let p = sized_file(dir.path(), "v4.img", 8 * MIB);
    let mut h = kvcrypt_format::VolumeHeader::new_for_device(8 * MIB, 4096, "v4", &vmk).unwrap();
    let shares = kvcrypt_crypto::shamir::split(&vmk, 2, 3).unwrap();
    for (x, _) in &shares {
        let mut s = slot(*x);
        s.key_id = format!("https://v{x}.vault.azure.net/keys/k/{x:032x}");
        s.check = Some(vec![0x20 + x; 40]);
        s.share = Some(*x);
        h.add_slot(s);
    }
    h.policy = kvcrypt_format::SlotPolicy::KOfN { k: 2 };
    h.seal(&vmk);
    kvcrypt_header_io::write(&p, &mut h).unwrap();

    let block = read_at(&p, PRIMARY, 4096);
    assert_eq!(u16::from_le_bytes([block[8], block[9]]), 4);
    let md = read_at(&p, PRIMARY + 4096, u64le(&block, 168) as usize);
    let j: serde_json::Value = serde_json::from_slice(&md).unwrap();
    assert_eq!(
        j.as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        vec!["access_check", "key_check", "keyslots", "mac", "policy"]
    );
    let policy = j["policy"].as_object().unwrap();
    assert_eq!(
        policy.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["kind", "shares", "threshold"]
    );
    assert_eq!(
        (
            &j["policy"]["kind"],
            &j["policy"]["threshold"],
            &j["policy"]["shares"]
        ),
        (&"k-of-n".into(), &2.into(), &3.into())
    );
    let slots = j["keyslots"].as_array().unwrap();
    for (i, s) in slots.iter().enumerate() {
        assert_eq!(s["share"], i + 1);
    }

    let key_check = hmac(
        &hkdf32(b"kvcrypt-v1-kdf", vmk.expose(), b"kvcrypt v1 key-check key"),
        &[b"kvcrypt v1 key check"],
    );
    let access_check = hmac(
        &hkdf32(
            b"kvcrypt-v1-kdf",
            vmk.expose(),
            b"kvcrypt v2 access-check secret",
        ),
        &[b"kvcrypt v2 access check"],
    );
    let mut input = b"kvcrypt-header-mac-v1".to_vec();
    input.extend_from_slice(&4u16.to_le_bytes());
    input.extend_from_slice(&block[24..40]);
    lp(&mut input, text(&block[40..88]).as_bytes());
    lp(&mut input, text(&block[88..120]).as_bytes());
    input.extend_from_slice(&block[120..144]);
    input.extend_from_slice(&key_check);
    input.extend_from_slice(&access_check);
    // §4: policy kind (2 = k-of-n), threshold, shares.
    input.extend_from_slice(&[2, 2, 3]);
    input.extend_from_slice(&(slots.len() as u32).to_le_bytes());
    for s in slots {
        input.extend_from_slice(&(s["id"].as_u64().unwrap() as u32).to_le_bytes());
        for m in ["provider", "key_id", "algorithm"] {
            lp(&mut input, s[m].as_str().unwrap().as_bytes());
        }
        lp(
            &mut input,
            &B64.decode(s["wrapped"].as_str().unwrap()).unwrap(),
        );
        lp(&mut input, s["created_at"].as_str().unwrap().as_bytes());
        lp(
            &mut input,
            &B64.decode(s["check"].as_str().unwrap()).unwrap(),
        );
        input.push(s["share"].as_u64().unwrap() as u8);
    }
    let k_mac = hkdf32(
        b"kvcrypt-v1-kdf",
        vmk.expose(),
        b"kvcrypt v1 header-mac key",
    );
    assert_eq!(
        B64.decode(j["mac"]["value"].as_str().unwrap()).unwrap(),
        hmac(&k_mac, &[&input])
    );

    // §3.3: GF(2^8) mod x^8 + x^4 + x^3 + x + 1, Lagrange at 0 over any 2 of the 3 shares.
    fn mul(mut a: u8, mut b: u8) -> u8 {
        let mut p = 0;
        while b != 0 {
            if b & 1 == 1 {
                p ^= a;
            }
            a = if a & 0x80 != 0 {
                (a << 1) ^ 0x1b
            } else {
                a << 1
            };
            b >>= 1;
        }
        p
    }
    fn inv(a: u8) -> u8 {
        (1..=255u8).find(|&b| mul(a, b) == 1).unwrap()
    }
    for (i, j2) in [(0usize, 1usize), (0, 2), (1, 2)] {
        let (xi, yi) = (shares[i].0, shares[i].1.expose());
        let (xj, yj) = (shares[j2].0, shares[j2].1.expose());
        let li = mul(xj, inv(xj ^ xi));
        let lj = mul(xi, inv(xi ^ xj));
        let secret: Vec<u8> = (0..64).map(|b| mul(li, yi[b]) ^ mul(lj, yj[b])).collect();
        assert_eq!(&secret[..], &vmk.expose()[..], "shares {xi} and {xj}");
    }
}
