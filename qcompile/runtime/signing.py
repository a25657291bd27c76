"""Signing artifacts with a per-user key, so that loading can tell "I built this" from "someone sent me this".

A backend library (``backend/module.so``) is native code that loading runs. The manifest lists the
sha256 of every file, so a signature over the manifest vouches for the library too. The signature
is an HMAC-SHA256 keyed with 32 random bytes kept in the user's key file:

* ``$QCOMPILE_SIGNING_KEY_FILE`` if set, else ``$XDG_CONFIG_HOME/qcompile/signing.key`` (default
  ``~/.config/qcompile/signing.key``);
* created on the first save, mode 0600 in a 0700 folder; a key file that others can read or write,
  or that another user owns, is refused (whoever can read it can sign as you).

Only someone holding the key can make a signature that verifies, so a verified artifact was saved
by this user (on any machine sharing the key file). HMAC is symmetric: the key is a secret, not a
public identity, and signatures cannot be checked by third parties.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from qcompile.errors import ArtifactError

SCHEME = "hmac-sha256"
KEY_BYTES = 32
KEY_ENV = "QCOMPILE_SIGNING_KEY_FILE"


def key_path() -> Path:
    """Where this user's signing key lives (see the module docstring)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config).expanduser() / "qcompile" / "signing.key"


def _read_key(path: Path) -> bytes | None:
    """The key in ``path``, None if there is none; ArtifactError if it is unsafe or malformed."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ArtifactError(f"cannot read the signing key {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"the signing key {path} is not a regular file; remove it (a new one is made on save)")
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ArtifactError(
            f"the signing key {path} is owned by another user or readable/writable by others (mode "
            f"{stat.S_IMODE(st.st_mode):o}); anyone who can read it can sign artifacts as you. Run "
            f"`chmod 600 {path}` if it is yours, else remove it (a new one is made on the next save)"
        )
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ArtifactError(
            f"the signing key {path} holds {len(key)} bytes, not {KEY_BYTES}; remove it (a new one is made on save; "
            "artifacts signed with the old one then need --trust-library or a re-save)"
        )
    return key


def local_key(create: bool) -> bytes | None:
    """This user's key; made (atomically, 0600) when ``create`` and there is none yet."""
    path = key_path()
    key = _read_key(path)
    if key is not None or not create:
        return key
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another process made one first: use theirs
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise ArtifactError(
            f"cannot create the signing key {path}: {e.strerror}; set {KEY_ENV} to a writable path"
        ) from None
    key = _read_key(path)
    assert key is not None
    return key


def key_id(key: bytes) -> str:
    """A short public name for ``key`` (shows which key signed an artifact, reveals nothing of it)."""
    return hashlib.sha256(b"qcompile signing key id\0" + key).hexdigest()[:16]


def _body(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k not in ("checksum", "signature")}
    return json.dumps(body, sort_keys=True).encode("utf-8")


def sign(manifest: dict[str, Any]) -> dict[str, str]:
    """The signature of ``manifest`` (everything but its checksum and signature) with this user's key."""
    key = local_key(create=True)
    assert key is not None
    return {"scheme": SCHEME, "key_id": key_id(key), "value": hmac.new(key, _body(manifest), "sha256").hexdigest()}


def check(manifest: dict[str, Any]) -> str | None:
    """None when ``manifest`` carries a signature made with this user's key; otherwise why not."""
    sig = manifest.get("signature")
    if not isinstance(sig, dict) or sig.get("scheme") != SCHEME or not isinstance(sig.get("value"), str):
        return "it is not signed"
    key = local_key(create=False)
    if key is None:
        return f"it is signed, but this user has no signing key ({key_path()})"
    if sig.get("key_id") != key_id(key):
        return f"it is signed with another key (id {str(sig.get('key_id'))[:16]!r}; yours is {key_id(key)!r})"
    good = hmac.new(key, _body(manifest), "sha256").hexdigest()
    if not hmac.compare_digest(good.encode(), sig["value"].encode("utf-8", "replace")):
        return "its signature does not match its contents (altered after signing)"
    return None
