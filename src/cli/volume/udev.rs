//! udev-safe rendering of `kvcrypt probe` values, following blkid / udev conventions:
//! `ID_FS_LABEL` has unsafe characters replaced by `_` (like `blkid_safe_string`), and
//! `ID_FS_LABEL_ENC` has them hex-escaped as `\xHH` (like `blkid_encode_string`), so a label
//! can never inject another `KEY=value` line or shell metacharacters into udev rules.

/// Characters udev passes through unchanged (blkid's allow-list), plus any non-ASCII UTF-8.
fn is_safe(c: char) -> bool {
    c.is_ascii_alphanumeric() || "#+-.:=@_".contains(c) || !c.is_ascii()
}

/// Non-ASCII characters that are not printable (control characters, e.g. U+0085 NEL, which
/// some parsers treat as a line break) are unsafe as well.
fn is_safe_char(c: char) -> bool {
    is_safe(c) && !c.is_control()
}

/// `ID_FS_LABEL` form: whitespace and unsafe characters become `_`.
pub fn safe(s: &str) -> String {
    s.chars()
        .map(|c| if is_safe_char(c) { c } else { '_' })
        .collect()
}

/// `ID_FS_LABEL_ENC` form: unsafe bytes become `\xHH`.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if is_safe_char(c) {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_rendered_udev_safe() {
        assert_eq!(safe("data-01"), "data-01");
        assert_eq!(encode("data-01"), "data-01");
        assert_eq!(safe("my disk"), "my_disk");
        assert_eq!(encode("my disk"), "my\\x20disk");
        assert_eq!(encode("a\nID_FS_TYPE=x"), "a\\x0aID_FS_TYPE=x");
        assert_eq!(safe("a\nb"), "a_b");
        assert_eq!(encode("$(rm)\\"), "\\x24\\x28rm\\x29\\x5c");
        assert_eq!(encode("Grüße"), "Grüße");
        assert_eq!(encode("x\u{85}"), "x\\xc2\\x85");
    }
}
