#!/bin/bash
# The system test's checks inside the guest (systemd PID 1, kvcrypt installed by make install).
# Started by kvtest.service once per boot; the phase file says which boot this is:
#   1 first boot: boot unlock + fstab mount, journal, lock/unlock, revoke/restore, reload,
#     restart, agent SIGKILL, worker SIGKILL, systemctl kill, hotplug add/remove/add, close
#     after umount with another worker running, attach without an agent + adoption;
#     then lock and reboot (reboot while suspended)
#   2 unlocked and mounted again after that reboot; emulator disabled; reboot while serving
#   3 boot with the vault unreachable; vault back → served and mounted by itself;
#     lock and power off (poweroff while suspended)
#   4 unlocked and mounted again; power off while serving (the host checks that shutdown)
. /usr/local/lib/kvtest/lib.sh
mkdir -p "$STATE_DIR"
PHASE=$(cat "$STATE_DIR/phase" 2>/dev/null || echo 1)
exec > >(tee -a "/var/log/kvtest.log") 2>&1
H "phase $PHASE ($TRANSPORT)"

shutdown_now() {  # KIND (reboot|poweroff) NEXT_PHASE
  echo "$2" > "$STATE_DIR/phase"
  # Only this file: a plain `sync` would wait for the flush of a suspended volume (its I/O is
  # held until it resumes).
  sync "$STATE_DIR/phase"
  logger -t kvtest "KVTEST-SHUTDOWN-REQUEST $1"
  echo "KVTEST-SHUTDOWN $1 $PHASE"
  systemctl --no-block "$1"
  exit 0
}

# ---- every boot: the volume unlocked at boot and the fstab entry mounted ----------------------
boot_checks() {
  H "boot: agent, unlock, fstab mount"
  local st
  st=$(timeout 300 systemctl is-system-running --wait 2>&1)
  R systemd-analyze
  R systemctl --failed --no-pager
  if wait_state "$VOL" serving 120 && wait_until 60 mounted_from; then
    local dev; dev=$(field "$VOL" block_device)
    local mnt_us agent_us
    mnt_us=$(systemctl show -p ActiveEnterTimestampMonotonic --value "$(mount_unit)")
    agent_us=$(systemctl show -p ActiveEnterTimestampMonotonic --value kvcrypt-agent)
    timing "boot$PHASE-to-agent-ready" "$(awk -v u="$agent_us" 'BEGIN { printf "%.2f", u / 1e6 }')"
    timing "boot$PHASE-to-mounted" "$(awk -v u="$mnt_us" 'BEGIN { printf "%.2f", u / 1e6 }')"
    check "boot$PHASE.mounted" "$VOL serving on $dev, $MNT from $(findmnt -no SOURCE "$MNT"), testfile md5" \
      'linked_to $VOL "$dev" && mounted_on "$dev" && md5_ok'
  else
    fail "boot$PHASE.mounted" "state=$(state "$VOL") mounted=$(findmnt -no SOURCE "$MNT")"
    dump_state
  fi
  check "boot$PHASE.system-running" "is-system-running: $st" '[ "$st" = running ]'
}

# Debugging one step (run.py --append kvtest.debug=worker-kill): boot, that step with udev and
# systemd's view printed every second, power off.
debug_worker_kill() {
  local w; w=$(worker_pid "$VOL")
  ( udevadm monitor --udev --property --subsystem-match=block > /run/kvtest-udev.log 2>&1 & echo $! > /run/kvtest-udev.pid )
  R kill -9 "$w"
  for i in $(seq 12); do
    echo "--- +${i}s"; systemctl --no-pager list-units --all 'dev-loop0.device' 'dev-disk-by\x2dkvcrypt-data.device' srv-data.mount | head -6
    ls -l /dev/disk/by-kvcrypt/; kvcrypt udev-name loop0; echo "udev-name rc=$?"
    sleep 1
  done
  kill "$(cat /run/kvtest-udev.pid)"; cat /run/kvtest-udev.log | grep -v '^$' | head -120
  journalctl -b -o short-monotonic --no-pager | tail -60
}

# ---- phase 1 ------------------------------------------------------------------------------------
phase1() {
  boot_checks
  if grep -qw kvtest.debug=worker-kill /proc/cmdline; then
    debug_worker_kill; echo "KVTEST-DONE $TRANSPORT"; shutdown_now poweroff done
  fi
  local w dev
  w=$(worker_pid "$VOL"); dev=$(field "$VOL" block_device)

  H "journal and notify socket"
  journalctl -b -u kvcrypt-agent --no-pager -o short-monotonic | tail -20
  check journal.state-change "a state-change line names volume, state and reason" \
    'journalctl -b -u kvcrypt-agent -o cat | grep -E "\\b$VOL\\b.*serving.*unlocked|\\b$VOL\\b.*unlocked.*serving"'
  check notify.worker-env "worker $w has no NOTIFY_SOCKET" \
    '[ -r /proc/$w/environ ] && ! tr "\\0" "\\n" < /proc/$w/environ | grep -q "^NOTIFY_SOCKET="'
  check secmem.worker "worker $w keeps its key in memfd_secret memory" 'grep -q secretmem /proc/$w/maps'
  check udev.named "udev named $dev /dev/disk/by-kvcrypt/$VOL before kvcrypt reported it served" \
    'udevadm info -q symlink "$dev" | grep -qw "disk/by-kvcrypt/$VOL" && ! journalctl -b -o cat | grep -q "udev did not name"'
  check notify.main-pid-only "no notification refused from a non-main PID" \
    '! journalctl -b -o cat | grep -q "reception only permitted for main PID"'

  H "lock / unlock"
  R kvcrypt lock "$VOL"
  if wait_state "$VOL" suspended 30; then
    start_held_write lock; sleep 3
    local held=no; held_done || held=yes
    R kvcrypt status "$VOL"
    # Restarting the agent meanwhile must neither hang nor resume it: still suspended after.
    local t0; t0=$(up)
    R systemctl restart kvcrypt-agent
    timing restart-while-suspended "$(since "$t0")"
    wait_until 30 eval 'is_state $VOL suspended'
    check restart.suspended "agent restarted while $VOL was locked: $(state "$VOL"), write still held" \
      'is_state $VOL suspended && ! held_done'
    R kvcrypt unlock "$VOL"
    wait_state "$VOL" serving 60
    wait_until 60 held_done
    check lock.unlock "lock -> suspended (write held: $held), unlock -> $(state "$VOL") on $(field "$VOL" block_device), write completed, md5" \
      '[ $held = yes ] && held_done && is_state $VOL serving && [ "$(field $VOL block_device)" = "$dev" ] && md5_ok'
  else fail lock.unlock "state after lock: $(state "$VOL")"; dump_state; fi

  H "revoke / restore in the emulator"
  local t0 t1
  t0=$(up); R "${A[@]}" revoke --principal "$CID" --op unwrap --key kek
  if wait_state "$VOL" suspended 60; then
    timing revoke-to-suspended "$(since "$t0")"
    start_held_write revoke; sleep 3
    local held=no; held_done || held=yes
    R kvcrypt status "$VOL"
    t1=$(up); R "${A[@]}" grant --principal "$CID" --op unwrap --key kek
    wait_state "$VOL" serving 60 && timing restore-to-serving "$(since "$t1")"
    wait_until 60 held_done
    check revoke.restore "revoke -> suspended (write held: $held), grant -> $(state "$VOL") on $(field "$VOL" block_device), md5" \
      '[ $held = yes ] && held_done && is_state $VOL serving && [ "$(field $VOL block_device)" = "$dev" ] && md5_ok'
  else fail revoke.restore "state after revoke: $(state "$VOL")"; "${A[@]}" grant --principal "$CID" --op unwrap --key kek; dump_state; fi

  H "systemctl reload"
  w=$(worker_pid "$VOL")
  sed -i 's/^check_interval = .*/check_interval = "3s"/' /etc/kvcrypt/kvcrypt.toml
  R systemctl reload kvcrypt-agent
  sleep 2
  check reload "reload applied (check every 3s), worker $w kept" \
    'systemctl is-active -q kvcrypt-agent && [ "$(worker_pid $VOL)" = "$w" ] && kvcrypt status $VOL | grep -q "check every 3s"'

  H "systemctl restart kvcrypt-agent"
  local mid; mid=$(mount_id); w=$(worker_pid "$VOL")
  t0=$(up); R systemctl restart kvcrypt-agent
  wait_state "$VOL" serving 60 && timing restart-to-adopted "$(since "$t0")"
  check restart "worker $w adopted (now $(worker_pid "$VOL")), mount id $mid kept ($(mount_id)), md5" \
    'is_state $VOL serving && [ "$(worker_pid $VOL)" = "$w" ] && [ "$(mount_id)" = "$mid" ] && md5_ok'

  H "agent SIGKILL"
  local p; p=$(agent_pid); w=$(worker_pid "$VOL"); mid=$(mount_id)
  t0=$(up); R kill -9 "$p"
  wait_until 60 new_agent_since "$p"
  wait_state "$VOL" serving 60 && timing agent-sigkill-to-adopted "$(since "$t0")"
  check agent.sigkill "agent $p killed, new agent $(agent_pid) adopted worker $w, mount kept, md5" \
    'is_state $VOL serving && [ "$(worker_pid $VOL)" = "$w" ] && [ "$(mount_id)" = "$mid" ] && md5_ok'

  H "worker SIGKILL"
  w=$(worker_pid "$VOL"); mid=$(mount_id)
  t0=$(up); R kill -9 "$w"
  wait_until 60 new_worker_since "$w"
  wait_state "$VOL" serving 60 && timing worker-sigkill-to-serving "$(since "$t0")"
  sleep 1
  timeout 60 sh -c "echo probe > '$MNT/after-worker-kill' && sync"
  check worker.sigkill "worker $w killed, now $(worker_pid "$VOL") on $(field "$VOL" block_device) (was $dev), mount id $mid -> $(mount_id), write + md5" \
    'is_state $VOL serving && [ "$(field $VOL block_device)" = "$dev" ] && [ "$(mount_id)" = "$mid" ] && [ "$(cat "$MNT/after-worker-kill")" = probe ] && md5_ok && no_d_state'

  H "systemctl kill --signal=SIGKILL kvcrypt-agent (agent and workers)"
  p=$(agent_pid); w=$(worker_pid "$VOL"); mid=$(mount_id)
  t0=$(up); R systemctl kill --signal=SIGKILL kvcrypt-agent
  wait_until 60 new_agent_since "$p"
  wait_state "$VOL" serving 90 && timing kill-all-to-serving "$(since "$t0")"
  sleep 1
  timeout 60 sh -c "echo probe2 > '$MNT/after-kill-all' && sync"
  check kill.all "agent $p + worker $w killed; now worker $(worker_pid "$VOL") on $(field "$VOL" block_device) (was $dev), mount id $mid -> $(mount_id), write + md5, no D state" \
    'is_state $VOL serving && [ "$(field $VOL block_device)" = "$dev" ] && [ "$(mount_id)" = "$mid" ] && [ "$(cat "$MNT/after-kill-all")" = probe2 ] && md5_ok && no_d_state'
  [ -f "$STATE_DIR/failures" ] && dump_state

  H "udev: hot-add, hot-remove, hot-add"
  t0=$(up); host hotplug-add hot
  if wait_until 120 test -b /dev/disk/by-id/virtio-kvhot && wait_state hot serving 120; then
    timing hotplug-to-served "$(since "$t0")"
    local hdev; hdev=$(field hot block_device)
    wait_until 20 test -L /dev/disk/by-kvcrypt/hot
    check hotplug.add "vdc attached by kvcrypt-attach@ as hot on $hdev, plaintext md5" \
      'linked_to hot "$hdev" && hot_md5_ok'
    t0=$(up); host hotplug-del hot
    wait_until 60 sh -c '! test -b /dev/disk/by-id/virtio-kvhot'
    if wait_until 60 eval 'dev_gone "$hdev" && [ -z "$(worker_pid hot)" ]'; then
      timing hotremove-to-closed "$(since "$t0")"
    fi
    sleep 2
    check hotplug.remove "vdc removed: $hdev gone, hot worker '$(worker_pid hot)', state $(state hot), no hung task" \
      'dev_gone "$hdev" && [ ! -e /dev/disk/by-kvcrypt/hot ] && [ -z "$(worker_pid hot)" ] && no_hung'
    t0=$(up); host hotplug-add hot
    if wait_until 120 test -b /dev/disk/by-id/virtio-kvhot && wait_state hot serving 120; then
      timing hotplug-again-to-served "$(since "$t0")"
      wait_until 20 test -L /dev/disk/by-kvcrypt/hot
      check hotplug.readd "served again on $(field hot block_device), plaintext md5" 'hot_md5_ok'
    else fail hotplug.readd "hot disk: $(ls -l /dev/disk/by-id/virtio-kvhot 2>&1) hot=$(state hot)"; dump_state; fi
  else fail hotplug.add "hot disk: $(ls -l /dev/disk/by-id/virtio-kvhot 2>&1) hot=$(state hot)"; dump_state; fi

  H "close after umount while another volume's worker (other transport) runs"
  # A worker started while $MNT is mounted must not keep that filesystem pinned in its mount
  # namespace: `pin` is served with the other transport by `kvcrypt open --no-access-checks` (not the agent).
  local other=fuse; [ "$TRANSPORT" = fuse ] && other=ublk
  truncate -s 16M /var/tmp/pin.img
  R kvcrypt --config /etc/kvtest/cli.toml format /var/tmp/pin.img --key-id https://myvault.vault.azure.net/keys/kek --label pin --yes
  R kvcrypt --config /etc/kvtest/cli.toml open /var/tmp/pin.img pin --transport "$other" --no-access-checks
  R systemctl stop "$(mount_unit)"
  R kvcrypt close "$VOL"; local rc=$?
  sleep 3
  check close.unpinned "umount $MNT with a $other worker running, then kvcrypt close $VOL: exit $rc, now $(state "$VOL"), device $(field "$VOL" block_device)" \
    '[ "$rc" = 0 ] && ! is_state $VOL serving && [ ! -e /dev/disk/by-kvcrypt/$VOL ]'
  R kvcrypt close pin
  # Still configured: `kvcrypt unlock` serves it again, and the fstab entry mounts it by itself.
  R kvcrypt unlock "$VOL"
  wait_state "$VOL" serving 60
  wait_until 60 mounted_from
  check close.remount "after close + unlock: $(state "$VOL"), $MNT mounted again by itself, md5" \
    'mounted_from && md5_ok'
  dev=$(field "$VOL" block_device)

  H "attach without an agent (udev + kvcrypt-attach@), adopted by a later agent"
  R systemctl stop kvcrypt-agent
  sleep 1
  host hotplug-del hot
  wait_until 60 sh -c '! test -b /dev/disk/by-id/virtio-kvhot'
  sleep 2
  t0=$(up); host hotplug-add hot
  if wait_until 120 test -b /dev/disk/by-id/virtio-kvhot && wait_until 120 eval 'p=$(worker_pid hot); [ -n "$p" ] && [ -d "/proc/$p" ] && [ -L /dev/disk/by-kvcrypt/hot ]'; then
    timing attach-without-agent "$(since "$t0")"
    local hw; hw=$(worker_pid hot); w=$(worker_pid "$VOL")
    check attach.no-agent "kvcrypt-attach@vdc served hot (worker $hw) with the agent stopped, md5" \
      '! systemctl is-active -q kvcrypt-agent && hot_md5_ok'
    R systemctl start kvcrypt-agent
    wait_state hot serving 60; wait_state "$VOL" serving 60
    check attach.adopted "agent adopted hot (worker $hw -> $(worker_pid hot)) and $VOL (worker $w -> $(worker_pid "$VOL"))" \
      'is_state hot serving && is_state $VOL serving && [ "$(worker_pid hot)" = "$hw" ] && [ "$(worker_pid $VOL)" = "$w" ]'
  else fail attach.no-agent "hot disk: $(ls -l /dev/disk/by-id/virtio-kvhot 2>&1) $(systemctl status 'kvcrypt-attach@*' --no-pager 2>&1 | tail -20)"; R systemctl start kvcrypt-agent; dump_state; fi

  H "lock, then reboot while suspended"
  # Checksums of files written through the earlier suspensions, verified after each boot.
  md5sum "$MNT/held-lock" "$MNT/held-revoke" | tee "$STATE_DIR/held.md5"
  R kvcrypt lock "$VOL"
  wait_state "$VOL" suspended 30 || fail reboot.suspended "state $(state "$VOL") before reboot"
  shutdown_now reboot 2
}

# ---- phase 2: after the reboot while suspended -------------------------------------------------
phase2() {
  boot_checks
  check boot2.files "files written before the reboot intact" 'md5sum -c --quiet "$STATE_DIR/held.md5"'
  H "next boot without the vault"
  R systemctl disable kvemu.service
  shutdown_now reboot 3
}

# ---- phase 3: the vault unreachable at boot ----------------------------------------------------
phase3() {
  H "boot with the vault unreachable"
  local st; st=$(timeout 300 systemctl is-system-running --wait 2>&1)
  R systemd-analyze
  timing boot3-finished "$(awk '{print $1}' /proc/uptime)"
  R kvcrypt status "$VOL"
  check vaultdown.boot "boot finished ($st) without the vault: agent $(systemctl is-active kvcrypt-agent), $VOL $(state "$VOL"), $MNT not mounted" \
    '[ "$st" = running ] && systemctl is-active -q kvcrypt-agent && ! is_state $VOL serving && ! findmnt "$MNT" >/dev/null'
  local t0; t0=$(up)
  R systemctl start kvemu.service
  # Measured from the emulator answering (its unit's start waits for its ready file).
  t0=$(up)
  ( for i in $(seq 40); do is_state "$VOL" serving && break; kvcrypt status "$VOL" | sed -n 's/^/  [vault back] /; /state\|last error\|reason/p'; sleep 2; done ) &
  if wait_state "$VOL" serving 120; then timing vault-back-to-served "$(since "$t0")"; fi
  if wait_until 120 mounted_from; then timing vault-back-to-mounted "$(since "$t0")"; fi
  # "Within one backoff step": after the vault answers, at most the attempt already under way
  # may fail (it started before the vault was up); the next one serves.
  local after; after=$(journalctl -b -u kvcrypt-agent -o cat --since "@$(( $(date +%s) - $(awk -v t="$t0" '{ printf "%d", $1 - t }' /proc/uptime) ))" | grep -c "volume $VOL: unlocking -> locked")
  check vaultdown.recovered "vault back: $VOL $(state "$VOL"), $MNT mounted by itself from $(findmnt -no SOURCE "$MNT"), $after failed attempt(s) after the vault answered, md5" \
    'is_state $VOL serving && mounted_from && [ "$after" -le 1 ] && md5_ok'
  R systemctl enable kvemu.service
  H "lock, then power off while suspended"
  R kvcrypt lock "$VOL"
  wait_state "$VOL" suspended 30 || fail poweroff.suspended "state $(state "$VOL") before poweroff"
  shutdown_now poweroff 4
}

# ---- phase 4: after the poweroff while suspended -----------------------------------------------
phase4() {
  boot_checks
  check boot4.files "files written before the poweroff intact" 'md5sum -c --quiet "$STATE_DIR/held.md5"'
  echo "KVTEST-DONE $TRANSPORT"
  shutdown_now poweroff done
}

case $PHASE in
  1) phase1 ;;
  2) phase2 ;;
  3) phase3 ;;
  4) phase4 ;;
  *) echo "kvtest: nothing to do in phase $PHASE" ;;
esac
