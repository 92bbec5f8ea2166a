# Sourced by scenarios: start the Key Vault emulator on guest loopback (port 443, so the vault and
# Entra ID host names resolve to it through kvcrypt's `resolve` setting), create a service
# principal, an RSA key "kek" it may use, and /etc/kvcrypt/kvcrypt.toml pointing kvcrypt at it.
# Sets KEY_ID.
emu_start() {
  rm -rf /tmp/kvemu; mkdir -p /tmp/kvemu /etc/kvcrypt
  kvcrypt-kv-emulator --port 443 --state-dir /tmp/kvemu --ready-file /tmp/kvemu/ready.json \
    >/tmp/kvemu/out 2>/tmp/kvemu/log &
  EMU_PID=$!
  wait_for '[ -s /tmp/kvemu/ready.json ]' 600 || { cat /tmp/kvemu/log; fail "emulator did not start"; }
  A="kvcrypt-kv-emulator admin --url https://127.0.0.1:443/_admin --state-dir /tmp/kvemu"
  $A create-principal --name guest >/tmp/kvemu/principal || fail "create-principal"
  CID=$(sed -n 's/.*"client_id": *"\([^"]*\)".*/\1/p' /tmp/kvemu/principal | head -1)
  SECRET=$(sed -n 's/.*"secret": *"\([^"]*\)".*/\1/p' /tmp/kvemu/principal | head -1)
  TENANT=$(sed -n 's/.*"tenant_id": *"\([^"]*\)".*/\1/p' /tmp/kvemu/ready.json | head -1)
  [ -n "$CID" ] && [ -n "$SECRET" ] && [ -n "$TENANT" ] || { cat /tmp/kvemu/principal; fail "cannot parse principal"; }
  $A create-key --key kek --kty RSA --size 2048 >/dev/null || fail "create-key"
  $A grant --principal "$CID" --op get,wrap,unwrap --key kek >/dev/null || fail "grant"
  printf '%s' "$SECRET" > /etc/kvcrypt/sp.secret; chmod 600 /etc/kvcrypt/sp.secret
  cat > /etc/kvcrypt/kvcrypt.toml <<EOT
[vault]
# The keys allowed to unlock volumes (the header does not choose the vault).
keys = ["https://myvault.vault.azure.net/keys/kek"]
resolve = ["myvault.vault.azure.net:443:127.0.0.1", "login.microsoftonline.com:443:127.0.0.1"]
ca_file = "/tmp/kvemu/ca.pem"
attempt_timeout_ms = 20000
deadline_ms = 60000

[vault.credential]
kind = "client-secret"
tenant_id = "$TENANT"
client_id = "$CID"
secret_file = "/etc/kvcrypt/sp.secret"
EOT
  KEY_ID=https://myvault.vault.azure.net/keys/kek
  T "emulator ready (pid $EMU_PID)"
}
emu_stop() {
  [ -n "${EMU_PID:-}" ] || return 0
  kill "$EMU_PID" 2>/dev/null || true
  wait_for "[ ! -d /proc/$EMU_PID ]" 100 || kill -9 "$EMU_PID" 2>/dev/null || true
}
