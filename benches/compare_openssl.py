#!/usr/bin/env python3
"""kvcrypt's XTS engine vs OpenSSL, measured in the same run, interleaved, medians + ratios.

    cargo build --release --bin kvcrypt
    pip install cryptography
    python3 benches/compare_openssl.py [--rounds 5] [--kvcrypt target/release/kvcrypt]

Each round runs, back to back on one core (all rates per CPU-second of the measuring thread,
so other load on a shared machine distorts them less):
  * `kvcrypt benchmark --json --seconds 1`
  * `openssl speed -evp aes-256-xts -bytes 4096 -seconds 2` and `-bytes 512` (system OpenSSL)
  * `python3 benches/openssl_xts.py` at 4096 and 512 (OpenSSL bundled in `cryptography`)
and prints the median of every figure and kvcrypt / OpenSSL ratios (MiB = 2^20 bytes).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def openssl_speed(size: int) -> tuple[str, float]:
    out = subprocess.run(
        ["openssl", "speed", "-evp", "aes-256-xts", "-bytes", str(size), "-seconds", "2"],
        capture_output=True, text=True, check=True).stdout
    ver = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    m = re.search(r"AES-256-XTS\s+([\d.]+)k", out)
    if not m:
        sys.exit(f"cannot parse openssl speed output:\n{out}")
    return ver, float(m.group(1)) * 1000 / (1 << 20)  # 'k' = 1000 bytes/s


def pyssl(size: int, mib: int) -> dict:
    out = subprocess.run([sys.executable, os.path.join(HERE, "openssl_xts.py"), "--json",
                          "--sector-size", str(size), "--mib", str(mib), "--repeat", "3"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kvcrypt", default=os.path.join(HERE, "..", "target", "release", "kvcrypt"))
    a = ap.parse_args()
    rows: dict[str, list[float]] = {}
    labels: dict[str, str] = {}

    def add(key: str, value: float, label: str) -> None:
        rows.setdefault(key, []).append(value)
        labels[key] = label

    for r in range(a.rounds):
        rep = json.loads(subprocess.run([a.kvcrypt, "benchmark", "--json", "--seconds", "1"],
                                        capture_output=True, text=True, check=True).stdout)
        for x in rep["results"]:
            add(f"kv-{x['implementation']}-{x['sector_size']}-{x['operation']}", x["mib_per_s"],
                f"kvcrypt {x['implementation']} {x['operation']} {x['sector_size']}-byte sectors")
        for size in (4096, 512):
            ver, v = openssl_speed(size)
            add(f"ossl-sys-{size}", v, f"{ver}: openssl speed -bytes {size}")
        for size, mib in ((4096, 256), (512, 64)):
            p = pyssl(size, mib)
            add(f"ossl-py-{size}-unit", p["per_unit_mib_s_median"],
                f"{p['openssl']} (cryptography): per {size}-byte unit, incl. Python call")
            add(f"ossl-py-{size}-native", p["per_unit_minus_overhead_mib_s"],
                f"{p['openssl']} (cryptography): per {size}-byte unit, call overhead removed")
            add(f"ossl-py-ceiling-{size}", p["mib_units_mib_s_median"],
                f"{p['openssl']} (cryptography): 1 MiB units (ceiling)")
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)

    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"# medians of {a.rounds} interleaved rounds, MiB/s per CPU-second (min..max)")
    for k in rows:
        print(f"{med[k]:9.1f}  ({min(rows[k]):.0f}..{max(rows[k]):.0f})  {labels[k]}")
    ceiling = statistics.median(rows["ossl-py-ceiling-4096"] + rows["ossl-py-ceiling-512"])
    print("\n# ratios (kvcrypt default implementation)")
    imp = "vaes-avx2" if "kv-vaes-avx2-4096-encrypt" in med else "portable"
    for size in (4096, 512):
        for op in ("encrypt", "decrypt"):
            kv = med[f"kv-{imp}-{size}-{op}"]
            print(f"{op} {size:>4}: {kv:8.1f} MiB/s = "
                  f"{kv / med[f'ossl-sys-{size}']:.2f}x openssl speed (system) | "
                  f"{kv / med[f'ossl-py-{size}-native']:.2f}x cryptography per-unit (overhead removed) | "
                  f"{kv / ceiling:.2f}x cryptography 1 MiB-unit ceiling")


if __name__ == "__main__":
    main()
