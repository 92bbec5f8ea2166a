#!/usr/bin/env bash
# Stages one guest image of the system test: a copy of the cached root filesystem, kvcrypt
# installed into it with the documented `make install DESTDIR=` (units, rules, binaries as
# shipped — nothing edited afterwards), the guest's configuration, the fstab line copied verbatim
# from README.md, the test-only units (emulator, checks, debug shell), then an ext4 image.
#
# Usage: make-image.sh ROOTFS REPO BINDIR PREPDIR TRANSPORT OUTDIR
#   TRANSPORT: "auto" (ublk in this kernel) or "fuse" — the `transport` of both volumes.
# Writes OUTDIR/root.img, OUTDIR/vmlinuz, OUTDIR/initrd.img.
set -euo pipefail
ROOTFS=$1 REPO=$2 BINDIR=$3 PREP=$4 TRANSPORT=$5 OUT=$6
HERE=$(cd "$(dirname "$0")" && pwd)
KVER=$(cat "$ROOTFS/.kver")
S=$OUT/stage
rm -rf "$S"; mkdir -p "$OUT"; cp -a "$ROOTFS" "$S"

# kvcrypt, exactly as an operator installs it (prebuilt release binaries: make only installs).
make -s -C "$REPO" install DESTDIR="$S" KVCRYPT="$BINDIR/kvcrypt" \
  EMULATOR="$BINDIR/kvcrypt-kv-emulator" >/dev/null
# The README's next step: `systemctl enable --now kvcrypt-agent.service` (offline form).
systemctl --root="$S" enable kvcrypt-agent.service >/dev/null 2>&1

# The vault: the emulator inside the guest on 127.0.0.1:443, state made by prepare-volumes.sh.
install -d -m 0700 "$S/var/lib/kvemu"; cp -a "$PREP/kvemu/." "$S/var/lib/kvemu/"
install -m 0600 "$PREP/client-secret" "$S/etc/kvcrypt/client-secret"
CID=$(cat "$PREP/client-id")
cat > "$S/etc/kvcrypt/kvcrypt.toml" <<EOT
# System test configuration (tests/system/make-image.sh).
[vault]
# The keys allowed to unlock volumes (the header does not choose the vault).
keys = ["https://myvault.vault.azure.net/keys/kek"]
resolve = ["myvault.vault.azure.net:443:127.0.0.1", "login.microsoftonline.com:443:127.0.0.1"]
ca_file = "/var/lib/kvemu/ca.pem"
# TCG is slow: generous per-call bounds.
attempt_timeout_ms = 20000
deadline_ms = 40000

[vault.credential]
kind = "client-secret"
tenant_id = "72f988bf-0000-4000-8000-00000000e4e1"
client_id = "$CID"
secret_credential = "kvcrypt-client-secret"

[agent]
check_interval = "2s"
check_jitter = 0.0
check_timeout = "30s"
hold = "10m"

[agent.unlock_retry]
initial = "1s"
max = "4s"
multiplier = 2.0
jitter = 0.0

[[volume]]
name = "data"
label = "data"
transport = "$TRANSPORT"

[[volume]]
name = "hot"
label = "hot"
transport = "$TRANSPORT"
EOT
chmod 0600 "$S/etc/kvcrypt/kvcrypt.toml"

# fstab: the root filesystem, and the kvcrypt line exactly as README.md documents it.
FSTAB_LINE=$(grep -m1 '^/dev/disk/by-kvcrypt/data ' "$REPO/README.md") \
  || { echo "make-image: README.md has no fstab line for /dev/disk/by-kvcrypt/data" >&2; exit 2; }
MNT=$(awk '{print $2}' <<<"$FSTAB_LINE")
mkdir -p "$S$MNT"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n%s\n' "$FSTAB_LINE" > "$S/etc/fstab"

# Test-only parts.
install -d "$S/etc/kvtest"
install -m 0644 "$HERE"/guest/*.service "$S/etc/systemd/system/"
install -d "$S/usr/local/lib/kvtest"
install -m 0755 "$HERE"/guest/*.sh "$S/usr/local/lib/kvtest/"
# The CLI outside the unit has no $CREDENTIALS_DIRECTORY: the checks' own commands read the
# secret from its file.
sed 's|^secret_credential = .*|secret_file = "/etc/kvcrypt/client-secret"|' "$S/etc/kvcrypt/kvcrypt.toml" > "$S/etc/kvtest/cli.toml"
{ cat "$PREP/expect.env"; echo "TRANSPORT=$TRANSPORT"; echo "MNT=$MNT"; } > "$S/etc/kvtest/env"
for u in "$HERE"/guest/*.service; do systemctl --root="$S" enable "$(basename "$u")" >/dev/null 2>&1; done
# ttyS0 carries the test's console output; no login prompt on it.
ln -sf /dev/null "$S/etc/systemd/system/serial-getty@ttyS0.service"
printf '127.0.0.1 localhost\n::1 localhost\n' > "$S/etc/hosts"
mkdir -p "$S/var/log/journal" "$S/var/lib/kvtest"
# A fixed machine id: an empty one makes every boot a "first boot" with a new id, and the
# persistent journal would be split per boot.
rm -f "$S/etc/machine-id"; systemd-machine-id-setup --root="$S" >/dev/null

cp "$S/boot/vmlinuz-$KVER" "$OUT/vmlinuz"; cp "$S/boot/initrd.img-$KVER" "$OUT/initrd.img"
rm -f "$OUT/root.img"
mkfs.ext4 -q -F -L root -E lazy_itable_init=0 -d "$S" "$OUT/root.img" 2G
rm -rf "$S"
echo "make-image: $OUT/root.img (kernel $KVER, transport $TRANSPORT, fstab: $FSTAB_LINE)"
