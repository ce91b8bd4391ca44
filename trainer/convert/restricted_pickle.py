"""A pickle reader that rebuilds data and nothing else: for LWM's VQGAN weights, which ship as a pickle.

``pickle.load`` runs whatever callables a file names, so a downloaded pickle can run
any code. :func:`load` resolves a global only from a fixed table of constructors of
plain data: dicts (``collections.OrderedDict`` and flax's ``FrozenDict`` become
dicts), numpy arrays, dtypes (bfloat16 included) and scalars, and jax arrays (rebuilt as numpy arrays,
the way jax pickles them). Lists, tuples, numbers and strings need no global. Any
other global is refused with a one-line ``ValueError`` naming it, before it is called.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Callable

import ml_dtypes
import numpy as np

from schemas import storage


def _numpy_reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise ValueError(f"refusing to rebuild an array of type {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _jax_array(fun: Callable, args: tuple, state: Any, aval_state: Any = None) -> np.ndarray:
    """jax's ``_reconstruct_array``: the array's numpy pickle, read back as numpy (``fun`` came from this table)."""
    value = fun(*args)
    value.__setstate__(state)
    return value


def _scalar(dtype, data=None):
    return np.frombuffer(data, dtype, 1)[0] if data is not None else dtype.type()


_ALLOWED: dict[tuple[str, str], Any] = {
    **{(module, "_reconstruct"): _numpy_reconstruct
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): _scalar for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("ml_dtypes", "bfloat16"): ml_dtypes.bfloat16,  # the scalar type a bfloat16 array's dtype pickles as
    ("collections", "OrderedDict"): dict,
    ("flax.core.frozen_dict", "FrozenDict"): dict,
    ("jax._src.array", "_reconstruct_array"): _jax_array,
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise ValueError(f"refusing to load global {module}.{name}: only dicts, lists, tuples, numbers, "
                             f"strings and numpy arrays are read")
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid):
        raise ValueError(f"refusing persistent id {pid!r}: only plain data is read")


def loads(data: bytes, where: str = "pickle") -> Any:
    """The plain data in ``data``; ``ValueError`` (one line, naming ``where``) for anything else or damage."""
    try:
        return _DataUnpickler(io.BytesIO(data)).load()
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    except Exception as error:  # pickle raises many types on damaged data
        raise ValueError(f"{where}: not a readable pickle ({type(error).__name__}: "
                         f"{' '.join(str(error).split())[:120]})") from None


def load(path: str) -> Any:
    """:func:`loads` of a file (local or any ``schemas.storage`` path)."""
    return loads(storage.read_bytes(path), path)
