"""Reading a ``taocache compare`` output folder in tests: ``out_<name>`` next to the experiment ``<name>.yaml``."""
import json
from pathlib import Path

import torch

from taohooks.compare import load_experiment
from taohooks.compare.store import RunStore


def results(folder: Path, name: str) -> dict:
    return json.loads((folder / f"out_{name}" / "results.json").read_text())


def reference(folder: Path, name: str) -> torch.Tensor:
    """The stored full-step video of the experiment's first evaluation prompt."""
    entry = load_experiment(folder / f"{name}.yaml").evaluation_prompts()[0]
    return RunStore(folder / f"out_{name}").load("full", entry)[0]
