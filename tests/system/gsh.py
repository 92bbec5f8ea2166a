#!/usr/bin/env python3
"""Runs a command in a running system-test guest's root shell (ttyS1), for debugging a hang:
    tests/system/gsh.py target/system-vm/run-auto/ttyS1.sock 'journalctl -b -u kvcrypt-agent' [SECONDS]
"""
import socket
import sys
import time

sock, cmd = sys.argv[1], sys.argv[2]
wait = float(sys.argv[3]) if len(sys.argv) > 3 else 5
s = socket.socket(socket.AF_UNIX)
s.connect(sock)
s.settimeout(0.5)
s.sendall((cmd + "\n").encode())
out = b""
end = time.time() + wait
while time.time() < end:
    try:
        d = s.recv(65536)
        if not d:
            break
        out += d
    except socket.timeout:
        pass
sys.stdout.write(out.decode(errors="replace").replace("\r", ""))
