"""Run folders: config, JSONL outputs appended as produced, summary.json and report.html.

A run folder remembers its config. Rerunning the same command resumes it;
running a different config into it is refused unless `force` is given.

While a `RunDir` is open, this process holds an exclusive lock (`fcntl.flock`) on
`<folder>/.lock`: a second run into the same folder (from another process) is
refused at once instead of mixing its files with the first one's. The lock goes
when the last `RunDir` of that folder in this process is gone, or the process ends.
"""

from __future__ import annotations

import json
import os
import weakref
from dataclasses import asdict
from pathlib import Path

from .atomic import atomic_write
from .errors import PersonavecError, arg

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: no locking there
    fcntl = None

LOCK_NAME = ".lock"
_held: dict[str, list] = {}  # resolved folder -> [lock file descriptor, open RunDirs of it in this process]


def _acquire(path: Path) -> str:
    key = str(path.resolve())
    if key in _held:  # this process already runs here (e.g. a resumed step): share its lock
        _held[key][1] += 1
        return key
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise PersonavecError(f"{path} is in use by another personavec run (it holds {path / LOCK_NAME}); wait "
                                  f"for it to finish or use another {arg('out')}") from None
    _held[key] = [fd, 1]
    return key


def _release(key: str) -> None:
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _held[key]
        os.close(entry[0])  # closing the descriptor drops the flock


def _read_config(config_path: Path) -> dict:
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError):
        raise PersonavecError(f"{config_path}: not a readable run config; use another {arg('out')}, or delete the "
                              "folder") from None
    if not isinstance(data, dict):
        raise PersonavecError(f"{config_path}: not a run config; use another {arg('out')}")
    return data


def check_folder(path: str | Path) -> Path:
    """`path` as a folder that is there or can be made: a file at (or above) it is a one-line error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PersonavecError(f"{path}: is a file, not a run folder; use another {arg('out')}")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise PersonavecError(f"{path}: {parent} is a file, not a folder")
            break
    return path


def config_dict(cfg, **first) -> dict:
    """A config dataclass as the JSON a run folder records: `first` keys (e.g. the command), then every field but
    `resume_keys` (which names fields, it is not one)."""
    data = asdict(cfg)
    data.pop("resume_keys", None)
    return {**first, **data}


class RunDir:
    def __init__(self, path: str | Path, config: dict, force: bool = False, resume_keys: tuple[str, ...] = ()):
        """Open (or create) a run folder for `config`.

        `resume_keys`: config keys that may change between resumptions without
        making it a different run (e.g. batch size).
        """
        self.path = check_folder(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = _acquire(self.path)  # before anything in the folder is read, deleted or written
        weakref.finalize(self, _release, self._lock)
        if not force:
            changed = self.differences(self.path, config, resume_keys)
            if changed:
                raise PersonavecError(
                    f"{self.path} holds a different run (config differs in: {', '.join(changed)}); "
                    f"use another {arg('out')} or pass {arg('force')} to overwrite it")
        else:
            for name in list(self.path.iterdir()):
                if name.is_file() and name.name != LOCK_NAME:
                    name.unlink()
        self.config = config
        self.write_json("config.json", config)

    @classmethod
    def replace(cls, path: str | Path, config: dict) -> "RunDir":
        """A record folder for a command that recomputes everything each time (monitor, screen): a previous run
        of the same command there is replaced; a folder holding anything else is refused."""
        path = check_folder(path)
        config_path = path / "config.json"
        if config_path.exists():
            old = _read_config(config_path)
            if old.get("command") != config.get("command"):
                raise PersonavecError(f"{path} holds a {old.get('command', 'different')!r} run; use another {arg('out')}")
            return cls(path, config, force=True)
        if path.exists() and any(p.name != LOCK_NAME for p in path.iterdir()):
            raise PersonavecError(f"{path} is not empty and holds no personavec run; use another {arg('out')}")
        return cls(path, config)

    @staticmethod
    def differences(path: str | Path, config: dict, resume_keys: tuple[str, ...] = ()) -> list[str]:
        """Config keys in which the run stored at `path` differs from `config` (empty: same run, or none yet)."""
        config_path = Path(path) / "config.json"
        if not config_path.exists():
            return []
        old = _read_config(config_path)
        return sorted(k for k in set(old) | set(config) if k not in resume_keys and old.get(k) != config.get(k))

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, data) -> Path:
        text = json.dumps(data, indent=2, ensure_ascii=False, default=str)
        return atomic_write(self.file(name), lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))

    def read_jsonl(self, name: str) -> list[dict]:
        """Rows already written; a torn last line (killed mid-write) is ignored and rewritten later."""
        path = self.file(name)
        if not path.exists():
            return []
        content = path.read_text(encoding="utf-8")
        rows, lines = [], content.splitlines()
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        if len(rows) < len(lines) or (rows and not content.endswith("\n")):
            # drop the torn tail so later appends start on a clean line
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return rows

    def append_jsonl(self, name: str, rows: list[dict]) -> None:
        with open(self.file(name), "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
