#!/usr/bin/env python3
"""kvcrypt system test: kvcrypt as installed, under a real systemd (PID 1) and udev.

Boots a Debian 12 guest (systemd 252, Debian's 6.12 cloud kernel with ublk_drv) under qemu TCG
with no network device. kvcrypt is installed into the guest only with `make install DESTDIR=`;
the Key Vault emulator runs inside the guest on loopback. The guest's checks
(tests/system/guest/kvtest.sh) run in four boots per transport; this driver boots the guest
again after each requested reboot/poweroff, performs the QMP hotplug the guest asks for, reads
each boot's journal back from the guest's disk to check its shutdown, and prints a summary.

Usage (as root): tests/system/run.py [--transport auto|fuse|all] [--bindir DIR] [--work DIR]
Exit status 0 only if every check of every transport passed.
"""

import argparse
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# Per boot: phase 1 does most of the work (TCG: ~5-8 min), the others one check and a shutdown.
BOOT_TIMEOUT = {1: 1200, 2: 420, 3: 480, 4: 420}
MAX_BOOTS = 6


def log(msg):
    print(f"system-test: {msg}", file=sys.stderr, flush=True)


def sh(*cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run(list(cmd), **kw)


class Qmp:
    """The few QMP commands the hotplug checks need (a blocking line-based client)."""

    def __init__(self, path):
        self.path = path
        self.sock = None
        self.events = []

    def connect(self, timeout=30):
        end = time.time() + timeout
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(self.path)
                break
            except OSError:
                if time.time() > end:
                    raise
                time.sleep(0.2)
        self.sock = s
        self.f = s.makefile("rw")
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")
            return r.get("return")

    def wait_event(self, name, timeout):
        end = time.time() + timeout
        while time.time() < end:
            for e in self.events:
                if e["event"] == name:
                    self.events.remove(e)
                    return e
            self.sock.settimeout(max(0.1, end - time.time()))
            try:
                line = self.f.readline()
            except (socket.timeout, TimeoutError):
                break
            finally:
                self.sock.settimeout(None)
            if line:
                self.events.append(json.loads(line))
        return None


class Run:
    """One transport: its image, its boots and what they printed."""

    def __init__(self, args, transport, prep, rootfs):
        self.args = args
        self.transport = transport
        self.prep = prep
        self.rootfs = rootfs
        self.dir = os.path.join(args.work, f"run-{transport}")
        self.results = []  # (check, PASS/FAIL, detail)
        self.timings = []  # (name, seconds)
        self.problems = []
        self.done = False
        self.hot_n = 0
        self.host_thread = None

    def build(self):
        t = time.time()
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        sh(os.path.join(HERE, "make-image.sh"), self.rootfs, REPO, self.args.bindir,
           self.prep, self.transport, self.dir)
        for v in ("data", "hot"):
            sh("cp", "--sparse=always", os.path.join(self.prep, f"{v}.img"),
               os.path.join(self.dir, f"{v}.img"))
        log(f"[{self.transport}] image built in {time.time() - t:.0f} s")

    def qemu_cmd(self, qmp, ttys1):
        d = self.dir
        return [
            "qemu-system-x86_64", "-accel", "tcg",
            # -cx16: without it about a quarter of 6.12 boots crashed under TCG.
            "-cpu", "max,-cx16", "-m", str(self.args.mem), "-smp", "2",
            "-nographic", "-no-reboot", "-nic", "none", "-monitor", "none",
            "-serial", "stdio", "-serial", f"unix:{ttys1},server=on,wait=off",
            "-qmp", f"unix:{qmp},server=on,wait=off",
            "-drive", f"file={d}/root.img,if=virtio,format=raw,cache=unsafe",
            "-drive", f"file={d}/data.img,if=virtio,format=raw,cache=writeback",
            "-kernel", f"{d}/vmlinuz", "-initrd", f"{d}/initrd.img",
            "-append", "root=/dev/vda rw console=ttyS0 panic=-1 loglevel=4 "
                       "systemd.show_status=0 systemd.log_target=journal " + self.args.append,
        ]

    def hotplug(self, qmp, req):
        what = req.split()
        try:
            if what[0] == "hotplug-add":
                self.hot_n += 1
                node = f"hotnode{self.hot_n}"
                qmp.cmd("blockdev-add", **{"driver": "raw", "node-name": node,
                        "file": {"driver": "file",
                                 "filename": os.path.join(self.dir, "hot.img")}})
                # The serial names it in the guest: /dev/disk/by-id/virtio-kvhot.
                qmp.cmd("device_add", driver="virtio-blk-pci", drive=node, id="hotdisk",
                        serial="kvhot")
                log(f"[{self.transport}] hot-added hot.img as {node}")
            elif what[0] == "hotplug-del":
                qmp.cmd("device_del", id="hotdisk")
                # The guest acknowledges the ACPI eject; under TCG that can take a while.
                ev = qmp.wait_event("DEVICE_DELETED", 180)
                for attempt in range(30):
                    try:
                        qmp.cmd("blockdev-del", **{"node-name": f"hotnode{self.hot_n}"})
                        break
                    except RuntimeError:
                        if attempt == 29:
                            raise
                        time.sleep(1)
                log(f"[{self.transport}] hot-removed hotdisk ({'deleted' if ev else 'no DEVICE_DELETED event'})")
            else:
                self.problems.append(f"unknown host request {req!r}")
        except (RuntimeError, OSError, ValueError) as e:
            self.problems.append(f"host request {req!r} failed: {e}")
            log(f"[{self.transport}] {req}: {e}")

    def boot(self, n, phase):
        """Boots once; returns (requested shutdown kind or None, seconds from request to exit)."""
        qmp_path = os.path.join(self.dir, "qmp.sock")
        ttys1 = os.path.join(self.dir, "ttyS1.sock")
        for p in (qmp_path, ttys1):
            if os.path.exists(p):
                os.unlink(p)
        console = open(os.path.join(self.dir, f"console-boot{n}.log"), "wb")
        timeout = BOOT_TIMEOUT.get(phase, 420)
        log(f"[{self.transport}] boot {n} (phase {phase}), up to {timeout} s; "
            f"console {console.name}; root shell: {ttys1}")
        t0 = time.time()
        q = subprocess.Popen(self.qemu_cmd(qmp_path, ttys1), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        qmp = Qmp(qmp_path)
        qmp.connect()
        self.host_thread = None
        shutdown, t_req, buf = None, None, b""
        while True:
            left = t0 + timeout - time.time()
            if left <= 0:
                self.problems.append(f"boot {n} (phase {phase}) did not end within {timeout} s")
                log(f"[{self.transport}] boot {n}: timeout, killing qemu")
                q.kill()
                q.wait()
                break
            r, _, _ = select.select([q.stdout], [], [], min(left, 1.0))
            if not r:
                continue
            chunk = os.read(q.stdout.fileno(), 65536)
            if not chunk:
                q.wait()
                break
            console.write(chunk)
            console.flush()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").replace("\r", "")
                self.on_line(line, qmp)
                m = re.search(r"KVTEST-SHUTDOWN (\w+)", line)
                if m:
                    shutdown, t_req = m.group(1), time.time()
        console.close()
        if self.host_thread:
            self.host_thread.join(timeout=5)
        qmp.sock.close()
        took = time.time() - t_req if t_req else None
        log(f"[{self.transport}] boot {n} ended after {time.time() - t0:.0f} s "
            f"(qemu rc {q.returncode}; requested: {shutdown or 'nothing'}"
            + (f", {took:.1f} s after the request)" if took is not None else ")"))
        return shutdown, took

    def on_line(self, line, qmp):
        m = re.search(r"KVTEST-RESULT (\S+) (\S+) (PASS|FAIL) ?(.*)", line)
        if m:
            self.results.append((m.group(2), m.group(3), m.group(4)))
            print(f"  {m.group(3)} [{m.group(1)}] {m.group(2)}: {m.group(4)}", flush=True)
            return
        m = re.search(r"KVTEST-TIME (\S+) (\S+) (\S+)", line)
        if m:
            self.timings.append((m.group(2), m.group(3)))
            print(f"  TIME [{m.group(1)}] {m.group(2)} = {m.group(3)} s", flush=True)
            return
        m = re.search(r"KVHOST (hotplug-\S+.*)", line)
        if m:
            # Off the console loop: waiting for the guest to eject a disk must not stop us from
            # draining its console (a full pipe would stall the guest).
            req = m.group(1).strip()
            prev = self.host_thread
            def act(prev=prev, req=req):
                if prev:
                    prev.join()
                self.hotplug(qmp, req)
            self.host_thread = threading.Thread(target=act, daemon=True)
            self.host_thread.start()
            return
        if re.search(r"KVTEST-DONE", line):
            self.done = True
        # Kernel trouble is a failure whatever the checks said.
        if re.search(r"Kernel panic|BUG: |WARNING: CPU|blocked for more than \d+ seconds", line):
            self.problems.append(f"kernel: {line.strip()}")

    def journal_of_last_boot(self, n, kind, took):
        """Reads the guest's persistent journal from root.img: the boot that just ended."""
        mnt = tempfile.mkdtemp(prefix="kvsys-root-")
        out = os.path.join(self.dir, f"journal-boot{n}.txt")
        try:
            sh("mount", "-o", "loop,ro,noload", os.path.join(self.dir, "root.img"), mnt)
            jdir = os.path.join(mnt, "var/log/journal")
            with open(out, "w") as f:
                subprocess.run(["journalctl", "--directory", jdir, "-b", "0", "--no-pager",
                                "-o", "short-monotonic"], stdout=f, stderr=subprocess.STDOUT)
            js = subprocess.run(["journalctl", "--directory", jdir, "-b", "0", "-o", "json",
                                 "--output-fields=MESSAGE,UNIT,MESSAGE_ID,JOB_TYPE,JOB_RESULT,"
                                 "_SYSTEMD_UNIT,__MONOTONIC_TIMESTAMP,SYSLOG_IDENTIFIER"],
                                capture_output=True, text=True).stdout
        finally:
            subprocess.run(["umount", mnt])
            os.rmdir(mnt)
        if kind is None:
            return
        entries = [json.loads(x) for x in js.splitlines() if x.strip()]

        def mono(e):
            return int(e.get("__MONOTONIC_TIMESTAMP", 0)) / 1e6

        def msg(e):
            m = e.get("MESSAGE", "")
            return m if isinstance(m, str) else ""
        req = [e for e in entries if "KVTEST-SHUTDOWN-REQUEST" in msg(e)]
        if not req:
            self.problems.append(f"boot {n}: no shutdown request in the journal")
            return
        t_req = mono(req[-1])
        after = [e for e in entries if mono(e) >= t_req]
        # systemd's "Stopped …" / "Unmounted …" (SD_MESSAGE_UNIT_STOPPED) per unit.
        stopped = {}
        for e in after:
            if e.get("MESSAGE_ID") == "9d1aaa27d60140bd96365438aad20286" and e.get("UNIT"):
                stopped.setdefault(e["UNIT"], mono(e))
        mount = subprocess.run(["systemd-escape", "-p", "--suffix=mount", "/srv/data"],
                               capture_output=True, text=True).stdout.strip()
        t_umount, t_agent = stopped.get(mount), stopped.get("kvcrypt-agent.service")
        last = mono(after[-1]) if after else t_req
        name = f"shutdown.boot{n}.{kind}"
        ok = True
        detail = [f"journal: {last - t_req:.1f} s from request to the last entry; qemu exit "
                  f"{took:.1f} s after the request" if took is not None else ""]
        if t_agent is None:
            ok = False
            detail.append("kvcrypt-agent.service was never stopped (its stop job was dropped?)")
        if t_umount is None:
            ok = False
            detail.append(f"{mount} never stopped")
        elif t_agent is not None and t_umount > t_agent:
            ok = False
            detail.append(f"{mount} unmounted {t_umount - t_agent:.1f} s AFTER the agent stopped")
        else:
            detail.append(f"{mount} unmounted at +{t_umount - t_req:.1f} s, agent stopped at "
                          + (f"+{t_agent - t_req:.1f} s" if t_agent else "never"))
        bad = [msg(e) for e in after if re.search(
            r"[Tt]imed out|timeout|Failed unmounting|blocked for more than|ordering cycle|"
            r"deleted to break|kvcrypt.*(fail|FAIL)",
            msg(e)) and "KVTEST" not in msg(e)]
        if bad:
            ok = False
            detail.append("journal: " + " | ".join(bad[:4]))
        self.results.append((name, "PASS" if ok else "FAIL", "; ".join(d for d in detail if d)))
        print(f"  {'PASS' if ok else 'FAIL'} [{self.transport}] {name}: {self.results[-1][2]}",
              flush=True)
        if took is not None:
            self.timings.append((f"{kind}-boot{n}-request-to-qemu-exit", f"{took:.1f}"))

    def run(self):
        self.build()
        phase = 1
        for n in range(1, MAX_BOOTS + 1):
            kind, took = self.boot(n, phase)
            self.journal_of_last_boot(n, kind, took)
            if self.done or kind is None:
                break
            phase += 1
        if not self.done:
            self.problems.append("the checks did not reach their end (KVTEST-DONE)")
        return self.ok()

    def ok(self):
        return (self.done and not self.problems and self.results
                and all(r[1] == "PASS" for r in self.results))


def prepare(args):
    """Cached rootfs + the volumes and emulator state (made in a private network namespace)."""
    rootfs = subprocess.run([os.path.join(HERE, "build-rootfs.sh"), os.path.join(args.work, "cache")],
                            check=True, capture_output=False, stdout=subprocess.PIPE,
                            text=True).stdout.strip().splitlines()[-1]
    prep = os.path.join(args.work, "prep")
    sh("unshare", "--net", os.path.join(HERE, "prepare-volumes.sh"), args.bindir, prep)
    return rootfs, prep


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transport", default="all", choices=["auto", "fuse", "all"])
    ap.add_argument("--bindir", default=os.path.join(REPO, "target", "release"),
                    help="prebuilt kvcrypt and kvcrypt-kv-emulator (default target/release)")
    ap.add_argument("--work", default=os.path.join(REPO, "target", "system-vm"))
    ap.add_argument("--mem", type=int, default=1536)
    ap.add_argument("--append", default="",
                    help="extra guest kernel command line (e.g. kvtest.debug=worker-kill)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("system-test: run as root (loop devices, FUSE, mount)")
    for tool in ("qemu-system-x86_64", "mmdebstrap", "unshare", "journalctl", "jq", "make"):
        if not shutil.which(tool):
            sys.exit(f"system-test: {tool} missing (scripts/setup.sh installs what the tests need)")
    for b in ("kvcrypt", "kvcrypt-kv-emulator"):
        if not os.access(os.path.join(args.bindir, b), os.X_OK):
            sys.exit(f"system-test: {args.bindir}/{b} not built (cargo build --release --bins)")
    args.bindir = os.path.abspath(args.bindir)
    args.work = os.path.abspath(args.work)
    os.makedirs(args.work, exist_ok=True)
    t0 = time.time()
    rootfs, prep = prepare(args)
    log(f"rootfs {rootfs}, volumes ready after {time.time() - t0:.0f} s")
    transports = ["auto", "fuse"] if args.transport == "all" else [args.transport]
    runs = []
    for t in transports:
        r = Run(args, t, prep, rootfs)
        ts = time.time()
        r.run()
        r.seconds = time.time() - ts
        runs.append(r)

    print("\n===== system test summary =====")
    ok = True
    for r in runs:
        label = "ublk" if r.transport == "auto" else r.transport
        good = r.ok()
        ok &= bool(good)
        npass = sum(1 for x in r.results if x[1] == "PASS")
        print(f"[{label}] {'PASS' if good else 'FAIL'}: {npass}/{len(r.results)} checks passed "
              f"in {r.seconds:.0f} s")
        for name, res, detail in r.results:
            if res != "PASS":
                print(f"    FAIL {name}: {detail}")
        for p in r.problems:
            print(f"    PROBLEM {p}")
        for name, secs in r.timings:
            print(f"    time {name}: {secs} s")
        print(f"    logs: {r.dir}/console-boot*.log, {r.dir}/journal-boot*.txt")
    print(f"total {time.time() - t0:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
