"""The admin API's bearer token, read from a file (never from a flag: those show in ``ps``)."""

from __future__ import annotations

from pathlib import Path

from streamlstm.errors import ConfigError

__all__ = ["MIN_TOKEN_BYTES", "read_token"]

#: Shorter than this is no secret (16 random bytes, hex: 32 characters).
MIN_TOKEN_BYTES = 16


def read_token(path: str | None) -> bytes:
    """The token in ``path``, surrounding whitespace stripped. The error names the file
    and the reason, never the content."""
    if not path:
        raise ConfigError("admin_token_file: required with admin_port")
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"admin_token_file: cannot read {path}: {exc.strerror}") from None
    if len(token) < MIN_TOKEN_BYTES:
        raise ConfigError(
            f"admin_token_file: {path} holds {len(token)} bytes; a token needs at least "
            f"{MIN_TOKEN_BYTES} (for example: openssl rand -hex 32)"
        )
    if any(b < 0x21 or b > 0x7E for b in token):
        raise ConfigError(
            f"admin_token_file: {path}: a token is printable ASCII without spaces "
            "(it travels in an HTTP header)"
        )
    return token
