"""Whose native code mlc runs.

An artifact (and a compile-cache entry) may carry `manifest.sig`: an HMAC-SHA256 of its manifest,
which holds the sha256 of every other member, so the signature covers the whole artifact. mlc loads
an artifact's native code only when the signature was made with a key the user trusts:

    MLC_KEY_FILE       the user's own secret key (default $XDG_CONFIG_HOME/mlc/key, else
                       ~/.config/mlc/key): 32 random bytes in hex, made (0600) the first time mlc
                       signs something. Artifacts and cache entries this user writes are signed with it.
    MLC_TRUSTED_KEYS   more key files, separated by ':' (';' on Windows): copies of the keys of people
                       or machines whose artifacts this user runs as they are.

A key file must belong to the user and be readable by nobody else (HMAC keys both sign and check:
whoever can read one can sign). An artifact without a trusted signature is rebuilt from its IR.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets

from mlc.ir.diagnostics import Location, error

from .files import write_atomically

ALGORITHM = "hmac-sha256"


def key_file() -> str:
    if os.environ.get("MLC_KEY_FILE"):
        return os.environ["MLC_KEY_FILE"]
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(config, "mlc", "key")


def own_key(create: bool = False) -> bytes | None:
    """The user's secret key; None when there is none yet and create is False."""
    path = key_file()
    if create and not os.path.exists(path):
        write_atomically(path, secrets.token_hex(32).encode() + b"\n", mode=0o600, replace=False)
    return read_key(path) if os.path.exists(path) else None


def read_key(path: str) -> bytes:
    """A key file's 32 bytes; a key others could read or replace, or a malformed one, is an error."""
    where = Location(path, 0, 0)
    try:
        with open(path, "rb") as f:
            st, text = os.fstat(f.fileno()), f.read(1024)
    except OSError as e:
        raise error(where, f"cannot read key file: {e.strerror}") from None
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o077):
        raise error(where, "key file must belong to you and be private (chmod 600): whoever can read or "
                           "replace it can sign native code that mlc would run")
    try:
        key = bytes.fromhex(text.decode("ascii").strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise error(where, "not an mlc key file (64 hexadecimal digits)")
    return key


def trusted_keys() -> dict[str, bytes]:
    """Key id -> key, for the user's own key and those in MLC_TRUSTED_KEYS."""
    keys = [read_key(p) for p in os.environ.get("MLC_TRUSTED_KEYS", "").split(os.pathsep) if p]
    own = own_key()
    return {key_id(k): k for k in ([own] if own else []) + keys}


def key_id(key: bytes) -> str:
    """Names the key in a signature, so a loader knows which of its keys to check with, without revealing it."""
    return hashlib.sha256(b"mlc key id\0" + key).hexdigest()[:16]


def sign(manifest: bytes, key: bytes) -> bytes:
    mac = hmac.new(key, manifest, hashlib.sha256).hexdigest()
    return json.dumps({"algorithm": ALGORITHM, "key": key_id(key), "mac": mac}).encode()


def signer(manifest: bytes, signature: bytes | None) -> str | None:
    """The id of the trusted key that signed `manifest`, or None (unsigned, a key not trusted, forged)."""
    try:
        sig = json.loads(signature)
        key = trusted_keys().get(sig["key"]) if sig["algorithm"] == ALGORITHM else None
        expected = hmac.new(key, manifest, hashlib.sha256).hexdigest() if key else None
        return sig["key"] if expected and hmac.compare_digest(sig["mac"].encode(), expected.encode()) else None
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None  # unsigned (signature None), or a malformed signature: as good as none
