"""The official Python SDK (azure-identity on MSAL, azure-keyvault-keys) against the emulator.

Run by tests/python_sdk.rs, which starts the emulator and passes everything in KVEMU_*
variables; the emulator's CA comes in REQUESTS_CA_BUNDLE / SSL_CERT_FILE. Prints one line
`RESULT {json}` with what each step saw and exits non-zero on the first unexpected outcome.
"""

import json
import os
import socket
import sys

import msal
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import ClientSecretCredential
from azure.keyvault.keys import (
    KeyClient,
    KeyRotationLifetimeAction,
    KeyRotationPolicy,
    KeyRotationPolicyAction,
)
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm

env = os.environ
AUTHORITY = env["KVEMU_AUTHORITY"]  # https://127.0.0.1:PORT
TENANT = env["KVEMU_TENANT"]
VAULT_URL = env["KVEMU_VAULT_URL"]  # https://myvault.vault.azure.net:PORT
KEY = env["KVEMU_KEY"]
SCOPE = "https://vault.azure.net/.default"

# The vault keeps its real host name (the certificate and the key ids name it); like an
# /etc/hosts entry, send it to the emulator on loopback.
_getaddrinfo = socket.getaddrinfo


def _loopback_vaults(host, *args, **kwargs):
    if isinstance(host, str) and host.endswith(".vault.azure.net"):
        host = "127.0.0.1"
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _loopback_vaults

results = {}


def name(enum_or_str):
    """`Rotate` for KeyRotationPolicyAction.ROTATE or a plain string."""
    return str(getattr(enum_or_str, "value", enum_or_str))


def actions(policy):
    return [[name(a.action), a.time_after_create, a.time_before_expiry] for a in policy.lifetime_actions]


def fail(step, why):
    results["failed"] = f"{step}: {why}"
    print("RESULT " + json.dumps(results), flush=True)
    sys.exit(1)


def credential(client_id, secret):
    # Instance discovery would ask login.microsoftonline.com itself (MSAL's default for
    # authorities it does not know); the MSAL step below points it at the emulator instead.
    return ClientSecretCredential(
        TENANT, client_id, secret, authority=AUTHORITY, disable_instance_discovery=True
    )


admin = credential(env["KVEMU_ADMIN_ID"], env["KVEMU_ADMIN_SECRET"])
crypto = credential(env["KVEMU_CRYPTO_ID"], env["KVEMU_CRYPTO_SECRET"])

# 1. A token through MSAL's tenant discovery (OpenID configuration) and token endpoint.
token = admin.get_token(SCOPE)
results["token"] = bool(token.token) and token.expires_on > 0

# 2. MSAL itself with instance discovery at the emulator.
app = msal.ConfidentialClientApplication(
    env["KVEMU_ADMIN_ID"],
    client_credential=env["KVEMU_ADMIN_SECRET"],
    authority=f"{AUTHORITY}/{TENANT}",
    instance_discovery=f"{AUTHORITY}/common/discovery/instance",
)
got = app.acquire_token_for_client(scopes=[SCOPE])
if "access_token" not in got:
    fail("msal with instance discovery", got)
results["msal_instance_discovery"] = True

# 3. The challenge check: with the vault on a port other than 443 the SDK refuses the
#    challenge (it compares host:port with the challenge resource's host).
try:
    KeyClient(VAULT_URL, admin).get_key(KEY)
    results["challenge_check_with_port"] = "accepted"
except ValueError as e:
    results["challenge_check_with_port"] = (
        "rejected" if "does not match the requested domain" in str(e) else f"other: {e}"
    )

# 4. get_key with the check turned off (the documented way for a port other than 443).
keys = KeyClient(VAULT_URL, admin, verify_challenge_resource=False)
key = keys.get_key(KEY)
results["kid"] = key.id
results["kty"] = name(key.key_type)
results["enabled"] = key.properties.enabled

# 5. wrap/unwrap through the vault: the crypto identity may not read the key, so the SDK
#    cannot wrap locally and sends both operations to the emulator.
cc = CryptographyClient(key.id, crypto, verify_challenge_resource=False)
secret = os.urandom(32)
wrapped = cc.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, secret)
unwrapped = cc.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key)
results["wrap_kid"] = wrapped.key_id
results["wrapped_len"] = len(wrapped.encrypted_key)
results["round_trip"] = unwrapped.key == secret

# 6. A wrong client secret: Entra's AADSTS7000215 reaches the caller.
try:
    credential(env["KVEMU_ADMIN_ID"], "not-the-secret").get_token(SCOPE)
    results["wrong_secret"] = "accepted"
except ClientAuthenticationError as e:
    results["wrong_secret"] = "AADSTS7000215" if "AADSTS7000215" in str(e) else str(e)

# 7. Rotation policy: the default, then set and read back.
default = keys.get_key_rotation_policy(KEY)
results["default_policy"] = actions(default)
policy = KeyRotationPolicy(
    lifetime_actions=[
        KeyRotationLifetimeAction(KeyRotationPolicyAction.rotate, time_after_create="P30D"),
        KeyRotationLifetimeAction(KeyRotationPolicyAction.notify, time_before_expiry="P10D"),
    ],
    expires_in="P90D",
)
updated = keys.update_key_rotation_policy(KEY, policy)
again = keys.get_key_rotation_policy(KEY)
results["set_policy"] = {
    "expires_in": again.expires_in,
    "actions": actions(again),
    "has_created": again.created_on is not None,
    "same_as_update": updated.expires_in == again.expires_in,
}

# 8. Managed identity, VM (IMDS) flavour: the SDK's IMDS base address can be moved with
#    AZURE_POD_IDENTITY_AUTHORITY_HOST, so it reaches the emulator's IMDS endpoint.
os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = AUTHORITY
from azure.identity import ManagedIdentityCredential  # noqa: E402  (reads the variable)

mi = ManagedIdentityCredential().get_token(SCOPE)
results["imds_token"] = bool(mi.token)

print("RESULT " + json.dumps(results), flush=True)
