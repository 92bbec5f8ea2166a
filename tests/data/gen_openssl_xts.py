#!/usr/bin/env python3
"""Regenerates the OpenSSL AES-256-XTS reference ciphertext used by tests/xts_vectors.rs.

`openssl enc` refuses XTS ("enc XTS ciphers not supported"), so this drives OpenSSL's
EVP_aes_256_xts twice, independently, and requires both to agree byte for byte:
  1. through `cryptography` (pip wheel, bundles its own OpenSSL, 4.0.0 when generated),
  2. through the system libcrypto (Debian 12: OpenSSL 3.0.x) via ctypes.
Per sector: key = openssl-xts.key.hex (data key || tweak key), IV/tweak = 16-byte
little-endian sector number (dm-crypt `plain64`), one EVP encryption per sector.

Usage: python3 tests/data/gen_openssl_xts.py     (pip install cryptography)
"""
import ctypes
import ctypes.util
import hashlib
import os

from cryptography.hazmat.backends.openssl import backend
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = bytes.fromhex(open(os.path.join(HERE, "openssl-xts.key.hex")).read().strip())
PLAIN = open(os.path.join(HERE, "plain-32k.bin"), "rb").read()

libcrypto = ctypes.CDLL(ctypes.util.find_library("crypto"))
libcrypto.EVP_CIPHER_CTX_new.restype = ctypes.c_void_p
libcrypto.EVP_aes_256_xts.restype = ctypes.c_void_p
libcrypto.OpenSSL_version.restype = ctypes.c_char_p


def plain64(sector: int) -> bytes:
    return sector.to_bytes(16, "little")


def enc_cryptography(data: bytes, sector: int) -> bytes:
    e = Cipher(algorithms.AES(KEY), modes.XTS(plain64(sector))).encryptor()
    return e.update(data) + e.finalize()


def enc_system(data: bytes, sector: int) -> bytes:
    ctx = ctypes.c_void_p(libcrypto.EVP_CIPHER_CTX_new())
    out = ctypes.create_string_buffer(len(data))
    outl = ctypes.c_int(0)
    ok = libcrypto.EVP_EncryptInit_ex(ctx, ctypes.c_void_p(libcrypto.EVP_aes_256_xts()), None,
                                      KEY, plain64(sector))
    ok &= libcrypto.EVP_EncryptUpdate(ctx, out, ctypes.byref(outl), data, len(data))
    libcrypto.EVP_CIPHER_CTX_free(ctx)
    assert ok == 1 and outl.value == len(data)
    return out.raw


def encrypt(data: bytes, sector_size: int, first: int, name: str) -> None:
    out = b""
    for i in range(len(data) // sector_size):
        s = data[i * sector_size:(i + 1) * sector_size]
        a, b = enc_cryptography(s, first + i), enc_system(s, first + i)
        assert a == b, f"OpenSSL builds disagree at sector {first + i}"
        out += a
    open(os.path.join(HERE, name), "wb").write(out)
    print(f"{name}: {hashlib.sha256(out).hexdigest()}")


print("cryptography:", backend.openssl_version_text())
print("system:", libcrypto.OpenSSL_version(0).decode())
encrypt(PLAIN, 512, 0, "openssl-xts-512-s0.bin")                  # sectors 0..63
encrypt(PLAIN, 4096, 0, "openssl-xts-4096-s0.bin")                # sectors 0..7
encrypt(PLAIN[:4096], 512, 1 << 40, "openssl-xts-512-s2p40.bin")  # 2^40 .. 2^40+7
encrypt(PLAIN[:4096], 4096, (1 << 32) + 5, "openssl-xts-4096-s2p32p5.bin")  # 2^32+5
