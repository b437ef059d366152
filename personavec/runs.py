"""Run folders: config, JSONL outputs appended as produced, summary.json and report.html.

A run folder remembers its config. Rerunning the same command resumes it;
running a different config into it is refused unless `force` is given.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .atomic import atomic_write
from .errors import PersonavecError


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
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        if not force:
            changed = self.differences(self.path, config, resume_keys)
            if changed:
                raise PersonavecError(
                    f"{self.path} holds a different run (config differs in: {', '.join(changed)}); "
                    "use another --out or pass --force to overwrite it")
        elif force:
            for name in list(self.path.iterdir()):
                if name.is_file():
                    name.unlink()
        self.config = config
        self.write_json("config.json", config)

    @classmethod
    def replace(cls, path: str | Path, config: dict) -> "RunDir":
        """A record folder for a command that recomputes everything each time (monitor, screen): a previous run
        of the same command there is replaced; a folder holding anything else is refused."""
        path = Path(path)
        config_path = path / "config.json"
        if config_path.exists():
            old = json.loads(config_path.read_text())
            if old.get("command") != config.get("command"):
                raise PersonavecError(f"{path} holds a {old.get('command', 'different')!r} run; use another --out")
            return cls(path, config, force=True)
        if path.exists() and any(path.iterdir()):
            raise PersonavecError(f"{path} is not empty and holds no personavec run; use another --out")
        return cls(path, config)

    @staticmethod
    def differences(path: str | Path, config: dict, resume_keys: tuple[str, ...] = ()) -> list[str]:
        """Config keys in which the run stored at `path` differs from `config` (empty: same run, or none yet)."""
        config_path = Path(path) / "config.json"
        if not config_path.exists():
            return []
        old = json.loads(config_path.read_text())
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
