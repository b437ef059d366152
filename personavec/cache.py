"""Where personavec keeps downloaded models, converted folders and on-disk caches (judge scores, base answers)."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path


def cache_dir() -> Path:
    """`$PERSONAVEC_CACHE`, else `$XDG_CACHE_HOME/personavec`, else `~/.cache/personavec`."""
    explicit = os.environ.get("PERSONAVEC_CACHE")
    if explicit:
        root = Path(explicit)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "personavec"
    root.mkdir(parents=True, exist_ok=True)
    return root


class SqliteCache:
    """SQLite key -> JSON value; one connection behind a lock, every put committed at once.

    WAL mode lets several processes share the file; the lock makes it safe across threads.
    """

    def __init__(self, path: str | Path, table: str = "cache"):
        if not table.isidentifier():
            raise ValueError(f"bad table name {table!r}")
        self.path, self.table = Path(path), table
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"CREATE TABLE IF NOT EXISTS {self.table} "
                             "(key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL)")
            self._db.commit()

    @staticmethod
    def key(*parts: str) -> str:
        return hashlib.sha256(json.dumps(list(parts), ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute(f"SELECT value FROM {self.table} WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO {self.table} (key, value, created) VALUES (?, ?, ?)",
                             (key, json.dumps(value), time.time()))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
