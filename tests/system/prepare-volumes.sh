#!/usr/bin/env bash
# Host side of the system test: makes the Key Vault emulator state and the two kvcrypt volumes
# the guest serves. Runs inside a private network namespace (run.py starts it with
# `unshare --net`), so the emulator can listen on 127.0.0.1:443 — the port a real vault URL
# implies, so the key ids in the headers carry no port — without touching the host's network.
#
# Usage: prepare-volumes.sh BINDIR OUTDIR
# Writes to OUTDIR: kvemu/ (emulator state: CA, admin token, principal, key `kek`; copied into
# the guest), client-id, client-secret, data.img (label `data`: ext4 with a 3 MiB random
# `testfile`), hot.img (label `hot`: for hotplug, ext4 with `hotfile`), and expect.env
# (md5 of testfile and of the whole plaintext of hot).
set -euo pipefail
B=${1:?usage: prepare-volumes.sh BINDIR OUTDIR}; OUT=${2:?OUTDIR}
ip link set lo up
rm -rf "$OUT"; mkdir -p "$OUT/kvemu" "$OUT/mnt"; cd "$OUT"
"$B/kvcrypt-kv-emulator" --port 443 --state-dir "$OUT/kvemu" --ready-file "$OUT/ready.json" \
  >emulator.out 2>emulator.log &
EP=$!
# The worker processes started below outlive `kvcrypt close` by a few milliseconds at most;
# the emulator is ours to stop.
trap 'kill $EP 2>/dev/null || true' EXIT
for _ in $(seq 200); do [ -s ready.json ] && break; sleep 0.1; done
[ -s ready.json ] || { echo "prepare: emulator did not start:"; cat emulator.log; exit 2; } >&2
A=("$B/kvcrypt-kv-emulator" admin --url https://127.0.0.1:443/_admin --state-dir "$OUT/kvemu")
"${A[@]}" create-principal --name guest-agent > principal.json
CID=$(jq -r .client_id principal.json); jq -r .secret principal.json | tr -d '\n' > client-secret
chmod 600 client-secret; echo "$CID" > client-id; rm principal.json
"${A[@]}" create-key --key kek --kty RSA --size 2048 >/dev/null
"${A[@]}" grant --principal "$CID" --op get,wrap,unwrap --key kek >/dev/null
cat > host.toml <<EOT
[vault]
# The keys allowed to unlock volumes (the header does not choose the vault).
keys = ["https://myvault.vault.azure.net/keys/kek"]
resolve = ["myvault.vault.azure.net:443:127.0.0.1", "login.microsoftonline.com:443:127.0.0.1"]
ca_file = "$OUT/kvemu/ca.pem"
[vault.credential]
kind = "client-secret"
tenant_id = "72f988bf-0000-4000-8000-00000000e4e1"
client_id = "$CID"
secret_file = "$OUT/client-secret"
EOT
K="$B/kvcrypt --config $OUT/host.toml"
truncate -s 64M data.img; truncate -s 32M hot.img
$K format data.img --key-id https://myvault.vault.azure.net/keys/kek --label data --yes >/dev/null
$K format hot.img --key-id https://myvault.vault.azure.net/keys/kek --label hot --yes >/dev/null
# Run-scoped volume names: a host agent or test using "data" must not collide with us.
N=sysprep-$$
DEV=$($K open data.img "$N-data" --transport fuse --no-access-checks)
mkfs.ext4 -q -F -L srvdata "$DEV"; mount "$DEV" mnt
head -c 3M /dev/urandom > mnt/testfile; TEST_MD5=$(md5sum < mnt/testfile | cut -d' ' -f1)
umount mnt; $K close "$N-data"
DEV=$($K open hot.img "$N-hot" --transport fuse --no-access-checks)
mkfs.ext4 -q -F -L hot "$DEV"; mount "$DEV" mnt
head -c 1M /dev/urandom > mnt/hotfile; umount mnt
HOT_MD5=$(md5sum < "$DEV" | cut -d' ' -f1)
$K close "$N-hot"
printf 'EXPECT_MD5=%s\nHOT_MD5=%s\nCID=%s\n' "$TEST_MD5" "$HOT_MD5" "$CID" > expect.env
rm -f ready.json; rmdir mnt
echo "prepare: data.img hot.img kvemu/ (testfile md5 $TEST_MD5, hot plaintext md5 $HOT_MD5)"
