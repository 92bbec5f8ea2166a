#!/usr/bin/env python3
"""Throughput of the OpenSSL bundled in Python's `cryptography` wheel for AES-256-XTS.

    pip install cryptography
    python3 benches/openssl_xts.py [--mib 256] [--sector-size 4096] [--repeat 5] [--json]

Encrypts --mib MiB of random data, single-threaded, and prints the median MiB/s of --repeat
runs, two ways. Time is this thread's CPU time (time.thread_time), like `openssl speed`,
so a busy shared machine does not distort the figure:
  * per unit: one `update_into` call per --sector-size bytes on one context — what
    `openssl speed -evp aes-256-xts -bytes N` measures (OpenSSL XTS treats every update as
    one data unit). Includes Python's per-call overhead (~0.3 µs), large at 512 bytes.
  * per unit, Python overhead removed: the per-unit time minus the time of a 16-byte call
    (an estimate of what native code calling OpenSSL per sector would see).
  * 1 MiB units: one call per MiB — OpenSSL's XTS ceiling without per-call overhead
    (the best case for OpenSSL; kvcrypt is compared against this).
"""
import argparse
import json
import os
import statistics
import time

from cryptography.hazmat.backends.openssl import backend
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--sector-size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    key = os.urandom(64)
    ss = a.sector_size
    data = os.urandom(a.mib << 20)
    mv = memoryview(data)

    def run(unit: int) -> float:
        e = Cipher(algorithms.AES(key), modes.XTS(bytes(16))).encryptor()
        out = bytearray(unit + 16)
        t = time.thread_time()
        for off in range(0, len(data), unit):
            e.update_into(mv[off:off + unit], out)
        return len(data) / (time.thread_time() - t) / (1 << 20)

    def per_sector() -> float:
        return run(ss)

    def call_overhead() -> float:
        """Seconds per update_into call on a 16-byte unit (Python + EVP call cost)."""
        e = Cipher(algorithms.AES(key), modes.XTS(bytes(16))).encryptor()
        out = bytearray(32)
        src = mv[:16]
        calls = 200_000
        t = time.thread_time()
        for _ in range(calls):
            e.update_into(src, out)
        return (time.thread_time() - t) / calls

    def one_call() -> float:
        return run(1 << 20)

    ps = [per_sector() for _ in range(a.repeat)]
    oc = [one_call() for _ in range(a.repeat)]
    ov = statistics.median([call_overhead() for _ in range(a.repeat)])
    per_unit_s = ss / (statistics.median(ps) * (1 << 20))
    native = ss / max(per_unit_s - ov, 1e-12) / (1 << 20)
    result = {
        "openssl": backend.openssl_version_text(),
        "sector_size": ss,
        "mib": a.mib,
        "per_unit_mib_s_median": statistics.median(ps),
        "mib_units_mib_s_median": statistics.median(oc),
        "call_overhead_us": ov * 1e6,
        "per_unit_minus_overhead_mib_s": native,
        "per_sector_runs": ps,
        "one_call_runs": oc,
    }
    if a.json:
        print(json.dumps(result))
    else:
        print(f"{result['openssl']}: AES-256-XTS, {ss}-byte units, {a.mib} MiB, median of {a.repeat}")
        print(f"  per unit of {ss:>5} bytes:          {result['per_unit_mib_s_median']:9.1f} MiB/s")
        print(f"  per unit, minus {ov * 1e6:.2f} us call overhead: {native:9.1f} MiB/s")
        print(f"  1 MiB units (ceiling):          {result['mib_units_mib_s_median']:9.1f} MiB/s")


if __name__ == "__main__":
    main()
