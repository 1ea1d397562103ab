"""Bearer tokens for the Serve applications: the token is read from the environment where an application is
built, and only its SHA-256 travels to the replicas (it is in no config, no replica argument, no log)."""

from __future__ import annotations

import hashlib
import hmac
import os


def token_digest(env_name: str | None) -> str | None:
    """SHA-256 of the token in environment variable `env_name`, or None when it is unset or blank (no auth)."""
    token = (os.environ.get(env_name) or "").strip() if env_name else ""
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def bearer_ok(authorization: str | None, digest: str | None) -> bool:
    """Whether an `Authorization` header carries the token whose digest is `digest` (always, without one)."""
    if digest is None:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    given = hashlib.sha256(token.strip().encode()).hexdigest()
    return scheme.lower() == "bearer" and hmac.compare_digest(given, digest)
