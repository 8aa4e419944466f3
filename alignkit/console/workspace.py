"""The console's folder: where it may read and write, and its runs, kept on disk so a restart finds them.

Every path a request names is resolved (symlinks followed) and must lie inside the workspace or a folder
the user allowed with `--allow`; anything else is refused. A run is a folder `runs/<id>/` with `run.json`
(kind, status, config, result), `log.txt`, and what the job writes (`output/`, the eval's report, ...).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alignkit.errors import UserError
from alignkit.modeling.resolve import looks_like_hub_id

STATUSES = ("queued", "running", "finished", "failed", "stopped", "interrupted")
RUN_ID = re.compile(r"^[a-z]+-\d{8}-\d{6}-[0-9a-f]{4}$")


class PathRefused(UserError):
    """A request named a path outside the workspace and the allowed folders; `key`: the form's key."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass
class Run:
    """One job of the console: what it was asked (`config`), where it stands, what it gave."""

    id: str
    kind: str  # train | eval | export
    config: dict[str, Any]
    status: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # what the run list shows: the stage and model

    def public(self) -> dict[str, Any]:
        return asdict(self)


class Workspace:
    def __init__(self, root: str | os.PathLike, allowed: Iterable[str | os.PathLike] = ()) -> None:
        self.root = Path(os.path.realpath(os.path.expanduser(root)))
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "runs").mkdir(exist_ok=True)
        self.roots = [self.root, *(Path(os.path.realpath(os.path.expanduser(a))) for a in allowed)]

    # ------------------------------------------------------------------------------------------------ paths
    def path(self, value: str, what: str = "path") -> Path:
        """`value` (absolute, or relative to the workspace) resolved with its symlinks; refused outside."""
        if not isinstance(value, str) or not value.strip() or "\x00" in value:
            raise UserError(f"{what}: give a path (got {value!r})")
        given = Path(os.path.expanduser(value.strip()))
        real = Path(os.path.realpath(given if given.is_absolute() else self.root / given))
        if not any(real == root or root in real.parents for root in self.roots):
            raise PathRefused(
                f"{what}: {value} is outside the workspace ({self.root}) and the folders allowed with --allow",
                what.split()[0],
            )
        return real

    def is_hub_id(self, value: str) -> bool:
        """`org/name` that is no local path, neither in the workspace nor where the library would look (the
        process's folder): a name for the hub."""
        return looks_like_hub_id(value) and not (self.root / value).exists() and not os.path.lexists(value)

    def model_or_hub(self, value: str, what: str) -> str:
        """A local model (inside) as its resolved path, or a hub id as given."""
        return value if isinstance(value, str) and self.is_hub_id(value) else str(self.path(value, what))

    def rel(self, path: str | os.PathLike) -> str:
        """A path as the page shows it: relative to the workspace when inside it."""
        p = Path(path)
        return str(p.relative_to(self.root)) if p == self.root or self.root in p.parents else str(p)

    # ------------------------------------------------------------------------------------------------- runs
    def run_dir(self, run_id: str) -> Path:
        if not RUN_ID.match(run_id):
            raise UserError(f"run id {run_id!r} is not one this console made")
        return self.root / "runs" / run_id

    def new_run(self, kind: str, config: dict[str, Any], label: str = "") -> Run:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run = Run(id=f"{kind}-{stamp}-{os.urandom(2).hex()}", kind=kind, config=config, label=label)
        self.run_dir(run.id).mkdir(parents=True)
        self.save(run)
        return run

    def save(self, run: Run) -> None:
        write_json_atomic(self.run_dir(run.id) / "run.json", run.public())

    def load(self, run_id: str) -> Run:
        path = self.run_dir(run_id) / "run.json"
        if not path.is_file():
            raise UserError(f"no run {run_id} in {self.root}")
        return Run(**json.loads(path.read_text(encoding="utf-8")))

    def runs(self) -> list[Run]:
        """Every run of the workspace, newest first."""
        found = []
        for folder in (self.root / "runs").iterdir():
            if RUN_ID.match(folder.name) and (folder / "run.json").is_file():
                found.append(self.load(folder.name))
        return sorted(found, key=lambda r: r.created, reverse=True)

    def recover(self) -> list[str]:
        """Runs a previous console left queued or running (it died): marked interrupted. Returns their ids."""
        lost = []
        for run in self.runs():
            if run.status in ("queued", "running"):
                run.status, run.error = "interrupted", "the console stopped while this run was " + run.status
                self.save(run)
                lost.append(run.id)
        return lost


def write_json_atomic(path: Path, data: Any) -> None:
    """`path` written whole or not at all (a temporary file beside it, renamed over it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, default=str)
    os.replace(tmp, path)
