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
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..config import ConfigError
from ..runtime.io import atomic_write_bytes
from .errors import CompareError
from .experiment import PromptEntry

__all__ = ["RunStore", "run_label", "entry_key", "folder_lock"]

LOCK_NAME = ".compare.lock"


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold ``folder/.compare.lock`` (pid, host, start time) while the body runs: a second writer is refused
    with the first one named. The lock is the kernel's (flock), so it goes with its process however that ends
    (SIGKILL, a scheduler's time limit, a restarted container with the same pid): nothing stale to take over."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock to take
        yield path
        return
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = json.loads(path.read_text())
        except (OSError, ValueError):
            holder = {}
        os.close(fd)
        raise ConfigError(str(path), "output", f"another taocache compare (pid {holder.get('pid', '?')} on "
                          f"{holder.get('host', '?')}, since {holder.get('since', '?')}) is writing {folder}; two "
                          "would overwrite each other's calibration and thresholds: wait for it or use another "
                          "output folder") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        yield path
    finally:
        os.ftruncate(fd, 0)  # the file stays (unlinking a locked file lets a third process lock a new inode)
        os.close(fd)


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


# what compare writes from its runs (results, their pictures): a folder holding one holds an experiment's work
RESULT_FILES = ("results.json", "results.md", "quality_vs_speedup.png", "skip_schedule.png", "strip.png",
                "side_by_side.gif")


def script_difference(was: List[str], now: List[str]) -> str:
    """Where two script lines (``[script, args...]``) differ, said by option: ``--guidance_scale 7.5 there, 5.0
    here`` (an option given twice, as an ``append`` one, says each value)."""
    from .targets import is_option

    def options(argv):
        found: Dict[str, List[List[str]]] = {}
        current = None
        for word in argv[1:]:
            if is_option(word):
                flag, _, value = word.partition("=")
                current = [value] if value else []
                found.setdefault(flag, []).append(current)
            elif current is not None:
                current.append(word)
            else:
                found.setdefault("(positional)", [[]])[0].append(word)
        return found

    def said(occurrences) -> str:
        if occurrences is None:
            return "(not given)"
        return " ".join(" ".join(values) or "(given)" for values in occurrences)

    if was[:1] != now[:1]:
        return f"script {was[0] if was else '(none)'} there, {now[0] if now else '(none)'} here"
    there, here = options(was), options(now)
    differ = [flag for flag in dict.fromkeys([*there, *here]) if there.get(flag) != here.get(flag)]
    if not differ:  # (the same options and values, in another order or as --name=value against --name value)
        return (f"the same options written otherwise ({' '.join(was[1:])!r} there, {' '.join(now[1:])!r} here: "
                "compared word for word)")
    return "; ".join(f"{flag} {said(there.get(flag))} there, {said(here.get(flag))} here" for flag in differ[:4]) \
        + (f" (and {len(differ) - 4} more)" if len(differ) > 4 else "")


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
        from safetensors import SafetensorError, safe_open

        path = self.run_path(label, entry)
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor("video"), json.loads(f.metadata()["record"])
        except (OSError, ValueError, KeyError, SafetensorError) as exc:  # damaged outside taohooks (its writes
            # are atomic): say which file
            raise CompareError(f"{path}: not a readable run of {label} for {entry.prompt!r} seed {entry.seed} "
                             f"({exc}); delete it and run the experiment again to remake it") from None

    def load_latents(self, label: str, entry: PromptEntry) -> Optional[torch.Tensor]:
        """The final latents stored with a run, or ``None`` where the script's were not recorded."""
        from safetensors import safe_open

        with safe_open(str(self.run_path(label, entry)), framework="pt") as f:
            return f.get_tensor("latents") if "latents" in f.keys() else None

    def recorded(self) -> Dict[str, Any]:
        """What the folder's ``experiment.json`` records (``{}`` where it has none)."""
        path = self.folder / "experiment.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def state(self, name: str) -> Optional[Any]:
        path = self.folder / "state" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def put_state(self, name: str, value: Any) -> None:
        if not self.writer:
            return
        atomic_write_bytes(self.folder / "state" / f"{name}.json", json.dumps(value, indent=1).encode())

    def _holds_work(self) -> bool:
        """Whether the folder holds what an experiment stored beside its ``experiment.json``: a run, state (a
        calibration, a threshold), results or their pictures (a folder whose runs were deleted to free space)."""
        return any((self.folder / name).is_file() for name in RESULT_FILES) or any(
            path.is_file() for sub in ("runs", "state") for path in (self.folder / sub).rglob("*"))

    def stored_without_record(self) -> str:
        """``"runs/"``, ``"state/"`` or ``"runs/ and state/"``: what of an experiment the folder holds (a run, a
        calibration, a threshold) without the ``experiment.json`` that says what it was made with; ``""`` if none."""
        if (self.folder / "experiment.json").is_file():
            return ""
        subs = [f"{sub}/" for sub in ("runs", "state") if any(p.is_file() for p in (self.folder / sub).rglob("*"))]
        return " and ".join(subs)

    def check_experiment(self, fingerprint: Dict[str, Any], optional=(), grown=(), alike=None,
                         partial: bool = False, comparable=None, unrecorded=None) -> None:
        """Record what this folder's runs are of; a folder holding another experiment's runs is an error.
        ``optional``: settings recorded only while a method reading them is listed; one on one side only
        is no change (experiment.json keeps every one recorded, so a method listed again is checked).
        ``grown``: dict settings that record more entries than earlier versions did (the model's identity): an
        entry the folder did not record is no change. ``alike``: ``{setting: values}`` that make the same runs
        (unset and the default it stands for). ``comparable``: ``{setting: f}``, the setting compared as ``f`` of
        it, both sides (the script line without the flags no run depends on), and said as given. ``partial``:
        ``fingerprint`` holds only some settings (those known before the script loads its model): the ones the
        folder recorded are checked, nothing is written. ``unrecorded``: ``{setting: (witness, value)}``, an optional
        setting added later: a folder that recorded ``witness`` (a setting of the same method) but not it made its
        runs with ``value``."""
        path = self.folder / "experiment.json"
        alike, comparable = alike or {}, comparable or {}

        def compared(k):
            """The folder's value of ``k`` and this experiment's, a grown setting's as the entries both record."""
            was, now = old.get(k), fingerprint.get(k)
            if k in comparable and was is not None and now is not None:
                was, now = comparable[k](was), comparable[k](now)
            if k in grown and isinstance(was, dict) and isinstance(now, dict):  # (the entries both record: another
                both = set(was) & set(now)                                        # version may record more or fewer)
                was, now = {s: v for s, v in was.items() if s in both}, {s: v for s, v in now.items() if s in both}
            return was, now

        def same(k) -> bool:
            was, now = compared(k)
            return was == now or (k in alike and was in alike[k] and now in alike[k])

        if path.is_file() and not self._holds_work():  # (a first call that failed: nothing of it to keep apart)
            if self.writer and not partial:
                atomic_write_bytes(path, json.dumps(fingerprint, indent=1).encode())
            return
        if path.is_file():
            old = json.loads(path.read_text())
            old.update({k: value for k, (witness, value) in (unrecorded or {}).items()
                        if k not in old and witness in old})
            current = "calibration.sampler" in old  # written by a taohooks that records the run settings
            keys = set(old) & set(fingerprint) if partial else set(old) | set(fingerprint)
            changed = [k for k in sorted(keys) if not same(k)
                       and not (current and k in optional and (k not in old or k not in fingerprint))]
            if changed:
                k = changed[0]
                if k not in old:  # recorded since: the runs may or may not match, and nothing can tell
                    others = len([j for j in changed if j not in old]) - 1
                    finished = (self.folder / "results.json").is_file()
                    raise ConfigError(str(path), k, f"this output folder was made by an earlier taohooks, which did "
                                      f"not record {k} (this experiment has {fingerprint.get(k)!r})"
                                      + (f" nor {others} other setting(s) this one records" if others > 0 else "")
                                      + "; its runs cannot be checked against this experiment: use another output "
                                      "folder (or delete it)" + (f"; taocache compare --report {self.folder} still "
                                                                 "rebuilds its results.md" if finished else ""))
                was, now = compared(k)  # (a dict setting: the entries both record, as compared)
                if isinstance(was, dict) and isinstance(now, dict):  # name the entry that differs (call settings)
                    sub = next(s for s in sorted(set(was) | set(now)) if was.get(s) != now.get(s))
                    k, was, now = f"{k}.{sub}", was.get(sub, "(not given)"), now.get(sub, "(not given)")
                def said(value):  # (an unset method setting: its default; a call setting is recorded as its repr)
                    if value is None and k in alike:
                        return f"unset (the default, {alike[k][1]!r})"
                    return value if k.startswith("call.") and isinstance(value, str) else repr(value)

                if k.startswith("script_config."):  # (the script's own config file, compared by content)
                    raise ConfigError(str(path), k, f"this output folder holds runs made with a config file of the "
                                      f"script giving {k.split('.', 1)[1]}: {was!r}; this experiment's gives {now!r}; "
                                      "use another output folder (or delete it)")
                if k == "script" and isinstance(was, list) and isinstance(now, list):  # (30 words each: the flag)
                    raise ConfigError(str(path), k, f"this output folder holds runs made with another script line: "
                                      f"{script_difference(*compared(k))}; use another output folder (or delete it)")
                raise ConfigError(str(path), k, f"this output folder holds runs made with {k} = {said(was)}, this "
                                  f"experiment has {said(now)}; use another output folder (or delete it)")
            merged = {**fingerprint, **old}  # (a setting both record keeps the folder's value: alike ones may differ)
            for k in grown:  # (entries recorded since: kept, so that the next run is checked against them)
                if isinstance(old.get(k), dict) and isinstance(fingerprint.get(k), dict):
                    merged[k] = {**old[k], **fingerprint[k]}
            grew = any(isinstance(old.get(k), dict) and isinstance(fingerprint.get(k), dict)
                       and set(fingerprint[k]) - set(old[k]) for k in grown)
            if self.writer and not partial and (set(fingerprint) - set(old) or grew):
                atomic_write_bytes(path, json.dumps(merged, indent=1).encode())
            return
        stored = self.stored_without_record()
        if stored:  # (experiment.json deleted, or runs/ and state/ copied without it: they were taken as this
            # experiment's, and its experiment.json then recorded them as such)
            raise ConfigError(str(path), "", f"missing, but this output folder holds {stored} of an unknown "
                              "experiment (experiment.json records what its runs were made with: the script line, "
                              "model and settings); they cannot be checked against this experiment: use another "
                              "output folder, or put back the experiment.json made with them (or delete "
                              f"{stored} to start the folder again)")
        if self.writer and not partial:
            atomic_write_bytes(path, json.dumps(fingerprint, indent=1).encode())
