"""The agents' bearer token (no torch here: the engine sidecars use it too)."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

TOKEN_ENV = "MOEPLACE_AGENT_TOKEN"


class TokenSource:
    """The bearer token: from a file (re-read when its mtime changes) or a fixed value (the env)."""

    def __init__(self, path: str | Path | None = None, value: str | None = None):
        if path is None and not value:
            raise ValueError(f"token: give --token-file or set {TOKEN_ENV}")
        self._path = Path(path) if path is not None else None
        self._value = value or ""
        self._mtime: float | None = None
        self.current()  # fail at start, not at the first request, when the file is unreadable

    @staticmethod
    def from_env_or_file(path: str | Path | None) -> TokenSource:
        return TokenSource(path, None if path is not None else os.environ.get(TOKEN_ENV))

    def current(self) -> str:
        if self._path is not None:
            mtime = self._path.stat().st_mtime
            if mtime != self._mtime:
                value = self._path.read_text().strip()
                if not value:
                    raise ValueError(f"token: {self._path} is empty")
                self._value, self._mtime = value, mtime
        return self._value

    def accepts(self, header: str | None) -> bool:
        scheme, _, presented = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return False
        return hmac.compare_digest(presented.strip().encode(), self.current().encode())
