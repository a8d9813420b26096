"""The resumable run store of ``taocache compare``: one file per finished generation.

    OUTPUT/experiment.json                       what was run (script arguments, loop); a different
                                                 experiment in the same folder is an error
    OUTPUT/runs/full/<key>.safetensors           the full-step reference of one (prompt, seed)
    OUTPUT/runs/teacache@4of50/<key>.safetensors a method at a budget (4 of 50 steps)
    OUTPUT/state/<name>.json                     calibration results, matched thresholds
    OUTPUT/.compare.lock                         the writing process (pid, host) while one runs

Each run file holds the video (``video``, ``[B, C, F, H, W]`` float32 in [-1, 1]) and its record
(wall time, calls, skipped calls) as JSON metadata. Files are written atomically, so a killed
experiment leaves only finished entries; a run whose file exists is never computed again. One
process writes a folder at a time (:func:`folder_lock`): two would each calibrate and search thresholds,
and overwrite each other's state.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..config import ConfigError
from ..runtime.io import atomic_write_bytes
from .experiment import PromptEntry

__all__ = ["RunStore", "run_label", "entry_key", "folder_lock"]

LOCK_NAME = ".compare.lock"


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # another user's process, or a pid that cannot be read: assume it runs
    return True


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold ``folder/.compare.lock`` (pid, host, start time) while the body runs: a second writer is refused
    with the first one named; a lock left by a process of this host that no longer runs is taken over."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            if attempt == 0 and holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                path.unlink(missing_ok=True)  # its process is gone (killed): take the folder over
                continue
            raise ConfigError(str(path), "output", f"another taocache compare (pid {holder.get('pid', '?')} on "
                              f"{holder.get('host', '?')}, since {holder.get('since', '?')}) is writing {folder}; two "
                              "would overwrite each other's calibration and thresholds: wait for it or use another "
                              f"output folder (if no such process runs, delete {path})") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def run_label(method: str, skips: int = 0, steps: int = 0) -> str:
    """``full`` or ``METHOD@SKIPSofSTEPS``: a method at a budget."""
    return "full" if method == "full" else f"{method}@{skips}of{steps}"


def entry_key(entry: PromptEntry) -> str:
    """A file name for a (prompt, seed) pair: stable across reorderings of the prompt list."""
    return hashlib.sha1(f"{entry.prompt}\0{entry.seed}".encode()).hexdigest()[:16]


def writes_results() -> bool:
    """Whether this process writes the experiment's files: rank 0 under torchrun (``RANK``, read before
    the script initialises its process group), or a single process."""
    import os

    return os.environ.get("RANK", "0") in ("", "0")


class RunStore:
    """The finished runs and the experiment's state under ``folder``; with ``writer=False`` (ranks
    > 0 under torchrun) it reads but never writes."""

    def __init__(self, folder: Path, writer: bool = True):
        self.folder = Path(folder)
        self.writer = writer

    def run_path(self, label: str, entry: PromptEntry) -> Path:
        return self.folder / "runs" / label / f"{entry_key(entry)}.safetensors"

    def has(self, label: str, entry: PromptEntry) -> bool:
        return self.run_path(label, entry).is_file()

    def save(self, label: str, entry: PromptEntry, video: Optional[torch.Tensor], record: Dict[str, Any],
             latents: Optional[torch.Tensor] = None) -> None:
        """The video (and the final latents the script decoded, where recorded) with the record."""
        from safetensors.torch import save

        if not self.writer:
            return
        meta = {"record": json.dumps({**record, "prompt": entry.prompt, "seed": entry.seed})}
        tensors = {"video": video.contiguous()}
        if latents is not None:
            tensors["latents"] = latents.contiguous()
        atomic_write_bytes(self.run_path(label, entry), save(tensors, metadata=meta))

    def load(self, label: str, entry: PromptEntry) -> Tuple[torch.Tensor, Dict[str, Any]]:
        from safetensors import safe_open

        path = self.run_path(label, entry)
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor("video"), json.loads(f.metadata()["record"])
        except Exception as exc:  # damaged outside taohooks (its writes are atomic): say which file
            raise ValueError(f"{path}: not a readable run of {label} for {entry.prompt!r} seed {entry.seed} "
                             f"({exc}); delete it and run the experiment again to remake it") from None

    def load_latents(self, label: str, entry: PromptEntry) -> Optional[torch.Tensor]:
        """The final latents stored with a run, or ``None`` where the script's were not recorded."""
        from safetensors import safe_open

        with safe_open(str(self.run_path(label, entry)), framework="pt") as f:
            return f.get_tensor("latents") if "latents" in f.keys() else None

    def state(self, name: str) -> Optional[Any]:
        path = self.folder / "state" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def put_state(self, name: str, value: Any) -> None:
        if not self.writer:
            return
        atomic_write_bytes(self.folder / "state" / f"{name}.json", json.dumps(value, indent=1).encode())

    def check_experiment(self, fingerprint: Dict[str, Any]) -> None:
        """Record what this folder's runs are of; a folder holding another experiment's runs is an error."""
        path = self.folder / "experiment.json"
        if path.is_file():
            old = json.loads(path.read_text())
            changed = [k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
            if changed:
                k = changed[0]
                if k not in old:  # recorded since: the runs may or may not match, and nothing can tell
                    raise ConfigError(str(path), k, f"this output folder was made by an earlier taohooks, which did "
                                      f"not record {k} (this experiment has {fingerprint.get(k)!r}); its runs cannot "
                                      "be checked against this experiment: use another output folder (or delete it)")
                raise ConfigError(str(path), k, f"this output folder holds runs made with {k} = {old.get(k)!r}, this "
                                  f"experiment has {fingerprint.get(k)!r}; use another output folder (or delete it)")
            return
        if self.writer:
            atomic_write_bytes(path, json.dumps(fingerprint, indent=1).encode())
