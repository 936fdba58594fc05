"""Reading and writing the meta-weights ("theta") of learned optimizers.

Two on-disk formats are understood:

* **The authors' format** (`*.state`): the bytes written by
  `flax.serialization.to_bytes`, i.e. a msgpack nested map
  `{"ff_mod_stack": {"~": {"w0__0": <array>, ..., "b2": <array>}}}` where every
  array is a msgpack `ExtType(1, msgpack([shape, dtype_name, raw_bytes]))`.
  It is decoded with the `msgpack` package alone; flax is not needed.
* **keras-lopt's format** (`*.npz`): a NumPy archive (no pickles) with one
  float32 array per meta-weight under its flat name (`w0__0` ... `w0__13`,
  `w1`, `w2`, `b0`, `b1`, `b2` for Celo2), plus a string entry
  `__format__ = "keras_lopt.theta.v1"` and a string entry `__rule__` naming
  the rule (`"celo2"`). Write it with `save_theta`.

Both load into a flat `dict[str, np.ndarray]` that is then validated against
the rule's expected shapes by `validate_theta`.
"""

import io
import os

import numpy as np

FORMAT_TAG = "keras_lopt.theta.v1"
_MSGPACK_NDARRAY_EXT = 1


def _decode_msgpack_arrays(raw):
    try:
        import msgpack
    except ImportError as e:  # pragma: no cover - msgpack is a core dep
        raise ImportError(
            "Reading `.state` checkpoints needs the `msgpack` package: "
            "`pip install msgpack`."
        ) from e

    def ext_hook(code, data):
        if code != _MSGPACK_NDARRAY_EXT:
            return msgpack.ExtType(code, data)
        shape, dtype_name, buffer = msgpack.unpackb(data, raw=False)
        array = np.frombuffer(buffer, dtype=np.dtype(dtype_name).newbyteorder("<"))
        return array.reshape(shape).astype(np.dtype(dtype_name))

    return msgpack.unpackb(raw, ext_hook=ext_hook, raw=False, strict_map_key=False)


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def read_flax_state(path):
    """Reads a flax `to_bytes` checkpoint into a flat `{path: array}` dict.

    Keys are the '/'-joined paths of the nested map, e.g.
    `"ff_mod_stack/~/w0__0"`.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        tree = _decode_msgpack_arrays(raw)
    except Exception as e:
        raise ValueError(
            f"Could not decode {path!r} as a flax/msgpack checkpoint: {e}"
        ) from e
    if not isinstance(tree, dict):
        raise ValueError(
            f"{path!r} is not a flax checkpoint of a dict (found "
            f"{type(tree).__name__} at the top level)."
        )
    return _flatten(tree)


def load_theta(source, module="ff_mod_stack/~"):
    """Loads meta-weights from a path or a mapping into `{name: float32 array}`.

    Args:
        source: a path to a `.state` file (authors' format) or a `.npz` file
            (keras-lopt's format), or a mapping from names to arrays.
        module: in the authors' format, the sub-tree holding the weights;
            names are returned relative to it. `None` keeps the whole tree
            with '/'-joined paths as names.

    Returns:
        A dict of float32 NumPy arrays.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"No learned-optimizer weights at {path!r}.")
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK"):
            with np.load(path, allow_pickle=False) as archive:
                theta = {k: archive[k] for k in archive.files}
            fmt = theta.pop("__format__", None)
            theta.pop("__rule__", None)
            if fmt is not None and str(fmt) != FORMAT_TAG:
                raise ValueError(
                    f"{path!r} has format {str(fmt)!r}; this version of "
                    f"keras-lopt reads {FORMAT_TAG!r}."
                )
        else:
            flat = read_flax_state(path)
            if module is None:
                return {k: np.asarray(v, dtype="float32") for k, v in flat.items()}
            prefix = module.rstrip("/") + "/"
            theta = {
                k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)
            }
            if not theta:
                raise ValueError(
                    f"{path!r} holds no weights under {module!r}; found top-level "
                    f"entries {sorted({k.split('/')[0] for k in flat})}."
                )
    elif hasattr(source, "items"):
        theta = dict(source.items())
    else:
        raise TypeError(
            "Learned-optimizer weights must be a path or a dict of arrays; "
            f"received {type(source).__name__}."
        )
    return {k: np.asarray(v, dtype="float32") for k, v in theta.items()}


def validate_theta(theta, expected_shapes, what="weights"):
    """Raises a `ValueError` naming every missing, extra or mis-shaped entry."""
    problems = []
    missing = sorted(set(expected_shapes) - set(theta))
    extra = sorted(set(theta) - set(expected_shapes))
    if missing:
        problems.append(f"missing entries {missing}")
    if extra:
        problems.append(f"unexpected entries {extra}")
    for name in sorted(set(theta) & set(expected_shapes)):
        shape = tuple(np.shape(theta[name]))
        if shape != tuple(expected_shapes[name]):
            problems.append(
                f"{name!r} has shape {shape}, expected {tuple(expected_shapes[name])}"
            )
    if problems:
        raise ValueError(f"These {what} do not fit: " + "; ".join(problems) + ".")
    return theta


def save_theta(path, theta, rule):
    """Writes meta-weights in keras-lopt's `.npz` format (see module doc)."""
    arrays = {k: np.asarray(v, dtype="float32") for k, v in theta.items()}
    arrays["__format__"] = np.array(FORMAT_TAG)
    arrays["__rule__"] = np.array(rule)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())
