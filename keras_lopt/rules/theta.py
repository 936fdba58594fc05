"""The meta-weights ("theta") of the learned rules: formats, loading, init.

`load(rule, weights)` is what every driver calls: `None` means the weights
shipped in `keras_lopt/rules/weights/`; the result is validated against the
rule's shapes. `init_theta(rule, seed)` gives fresh meta-weights for
meta-training.

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
  the rule (`"celo2"`, `"celo2_base"` or `"celo"`), and optionally a
  string entry `__provenance__`: a JSON object saying where the weights come
  from (version, meta-training run, command, iterations, wall time, ...).
  Write it with `save_theta`; `load` refuses a file tagged for another rule.

Shipped weights are versioned (`SHIPPED`): every version keras-lopt has
shipped stays loadable by name, e.g. `Celo2(weights="celo2-v1")`, and
`DEFAULT_VERSION` names the one `weights=None` means. `provenance(...)`
reads a file's record; `shipped_versions()` lists them all.

Both load into a flat `dict[str, np.ndarray]` that is then validated against
the rule's expected shapes by `validate_theta`.
"""

import io
import json
import os

import numpy as np

from keras_lopt.rules import celo
from keras_lopt.rules import celo2

FORMAT_TAG = "keras_lopt.theta.v1"
RULES = ("celo2", "celo2_base", "celo")
WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
# Versions are named "<rule>-v<N>" and never change once shipped, so that a
# result quoted with a version can be rerun after the defaults move on.
SHIPPED = {
    "celo2": ("celo2-v1", "celo2-v2", "celo2-v3", "celo2-v4"),
    "celo2_base": ("celo2_base-v1", "celo2_base-v2"),
    "celo": ("celo-v1", "celo-v2"),
}
DEFAULT_VERSION = {"celo2": "celo2-v4", "celo2_base": "celo2_base-v2", "celo": "celo-v2"}
_META_ENTRIES = ("__format__", "__rule__", "__provenance__")
# The authors' Celo2 checkpoints nest the MLP under this module; Celo's keep
# the whole tree (MLP bank and scheduler), keyed by path.
_AUTHORS_MODULE = {"celo2": "ff_mod_stack/~", "celo2_base": "ff_mod_stack/~", "celo": None}
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


def _check_rule(rule):
    if rule not in RULES:
        raise ValueError(f"Unknown rule {rule!r}; choose from {RULES}.")


def _npz_entry(path, key):
    with open(path, "rb") as f:
        if not f.read(4).startswith(b"PK"):
            return None
    with np.load(path, allow_pickle=False) as archive:
        return str(archive[key]) if key in archive.files else None


def rule_tag(path):
    """The `__rule__` entry of a keras-lopt `.npz`, or `None` (other formats)."""
    return _npz_entry(path, "__rule__")


def shipped_versions(rule=None):
    """The names of the shipped weight versions (of `rule`, or of all rules)."""
    if rule is not None:
        _check_rule(rule)
        return list(SHIPPED[rule])
    return [v for r in RULES for v in SHIPPED[r]]


def shipped_path(version):
    """The file of a shipped version, e.g. `shipped_path("celo2-v2")`."""
    if version not in shipped_versions():
        raise ValueError(
            f"{version!r} is not a shipped weight version; shipped: "
            f"{shipped_versions()}."
        )
    return os.path.join(WEIGHTS_DIR, f"{version}.npz")


def provenance(source):
    """Where meta-weights come from: the `__provenance__` record as a dict.

    Args:
        source: a shipped version name (`"celo2-v2"`), a rule name (its
            default version), or a path to a keras-lopt `.npz`.

    Returns:
        The record (version, rule, meta-training run and command,
        iterations, wall time, ...), or `None` when the file has none.

    Example:

    >>> provenance("celo2")["version"]
    'celo2-v4'
    """
    if source in RULES:
        source = DEFAULT_VERSION[source]
    if isinstance(source, str) and source in shipped_versions():
        source = shipped_path(source)
    raw = _npz_entry(os.fspath(source), "__provenance__")
    return None if raw is None else json.loads(raw)


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
            for key in _META_ENTRIES:
                theta.pop(key, None)
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


def save_theta(path, theta, rule, provenance=None):
    """Writes meta-weights in keras-lopt's `.npz` format (see module doc).

    `provenance`, a JSON-serialisable dict, is stored beside the weights.
    """
    arrays = {k: np.asarray(v, dtype="float32") for k, v in theta.items()
              if k not in _META_ENTRIES}
    arrays["__format__"] = np.array(FORMAT_TAG)
    arrays["__rule__"] = np.array(rule)
    if provenance is not None:
        arrays["__provenance__"] = np.array(json.dumps(provenance, sort_keys=True))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())


def theta_shapes(rule, theta=None):
    """The shapes `rule`'s meta-weights must have (Celo's bank size is read
    from `theta` when given)."""
    _check_rule(rule)
    if rule != "celo":
        return celo2.THETA_SHAPES
    bank = None if theta is None else theta.get("rnn_params/rnn_to_controls/b")
    bank_size = int(np.shape(bank)[0]) if bank is not None and np.ndim(bank) else 1
    return celo.theta_shapes(bank_size)


def load(rule, weights=None, what=None):
    """Loads and validates `rule`'s meta-weights.

    Args:
        rule: `"celo2"`, `"celo2_base"` or `"celo"`.
        weights: `None` for the default shipped version
            (`DEFAULT_VERSION[rule]`), a shipped version's name
            (`"celo2-v1"`; `SHIPPED`), `"momentum"` (`momentum_theta()`,
            Celo2 / Celo2Base), a path to a `.npz` (keras-lopt's
            format, checked against its `__rule__` tag) or a `.state` file
            (the authors' format), or a dict of arrays.
        what: the name used in error messages.

    Returns:
        A dict of float32 NumPy arrays with exactly `theta_shapes(rule)`.
    """
    _check_rule(rule)
    what = what or f"{rule} weights"
    if weights is None:
        weights = DEFAULT_VERSION[rule]
    if isinstance(weights, str) and weights == "momentum" and not os.path.exists(weights):
        if rule == "celo":
            raise ValueError("'momentum' meta-weights exist for Celo2 and Celo2Base only.")
        weights = momentum_theta()
    if isinstance(weights, str) and not os.path.exists(weights) and (
        weights in shipped_versions() or _looks_like_version(weights)
    ):
        weights = _shipped_file(rule, weights)
    if isinstance(weights, (str, os.PathLike)) and os.path.exists(weights):
        tag = rule_tag(os.fspath(weights))
        if tag is not None and tag != rule:
            raise ValueError(
                f"{os.fspath(weights)!r} holds {tag!r} meta-weights, not {rule!r} "
                f"ones: pass them to the optimizer of that rule, or pass "
                f"{rule!r} weights here."
            )
    theta = load_theta(weights, module=_AUTHORS_MODULE[rule])
    return validate_theta(theta, theta_shapes(rule, theta), what=what)


def version_name(rule, weights):
    """The name that `load(rule, weights)` resolves `weights` by, else `None`.

    `None` (the default) gives `DEFAULT_VERSION[rule]`; a shipped version's
    name or `"momentum"` gives itself. Paths and arrays have no name: an
    optimizer config must carry those weights themselves.
    """
    _check_rule(rule)
    if weights is None:
        return DEFAULT_VERSION[rule]
    if isinstance(weights, str) and not os.path.exists(weights):
        if weights in SHIPPED[rule] or (weights == "momentum" and rule != "celo"):
            return weights
    return None


def _looks_like_version(name):
    return "-v" in name and not name.endswith((".npz", ".state")) and os.sep not in name


def _shipped_file(rule, version):
    if version not in SHIPPED[rule]:
        raise ValueError(
            f"{version!r} is not a shipped version of {rule!r} weights; "
            f"choose from {list(SHIPPED[rule])} (default {DEFAULT_VERSION[rule]!r}), "
            f"or pass a path."
        )
    path = shipped_path(version)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"keras-lopt's shipped weights {path!r} are missing from this "
            "installation; pass `weights=` explicitly."
        )
    return path


def _truncated_normal(rng, shape, fan_in):
    """Normal at +-2 sigma, `sigma = 1 / sqrt(fan_in)` before truncation."""
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2.0
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2.0
    return (out / np.sqrt(fan_in)).astype("float32")


def _init_mlp(rng, shapes, prefix=""):
    # Zero biases; the first layer's blocks share the fan-in of all 30
    # features, as in the reference.
    theta = {}
    for name, shape in shapes.items():
        leaf = name[len(prefix):]
        if leaf.startswith("b"):
            theta[name] = np.zeros(shape, "float32")
        elif leaf.startswith("w0__"):
            theta[name] = _truncated_normal(rng, shape, sum(celo2.FEATURE_WIDTHS))
        else:
            theta[name] = _truncated_normal(rng, shape, shape[-2])
    return theta


def momentum_theta(decay_index=0):
    """Celo2 meta-weights whose MLP outputs the momentum `m_i` exactly.

    The first layer reads feature group 3 (the three momenta) and passes
    channel `decay_index` (decay 0.9, 0.99 or 0.999) through two ReLU units
    as `relu(m) - relu(-m) = m`; every other weight is zero. Features are
    normalised per channel and the step is normalised to unit RMS, so the
    scale does not matter: `Celo2` with these weights is Muon's update
    (orthogonalised heavy-ball momentum, no Nesterov) at Celo2's step sizes,
    and `Celo2Base` is normalised momentum. A starting point for
    meta-training (`keras-lopt meta-train --init-weights momentum`), whose
    held-out quality the learned weights must beat.
    """
    if decay_index not in range(len(celo2.MOMENTUM_DECAYS)):
        raise ValueError(f"decay_index must be 0, 1 or 2; received {decay_index!r}.")
    theta = {k: np.zeros(s, "float32") for k, s in celo2.THETA_SHAPES.items()}
    theta["w0__3"][decay_index, 0] = 1.0
    theta["w0__3"][decay_index, 1] = -1.0
    theta["w1"][0, 0] = theta["w1"][1, 1] = 1.0
    theta["w2"][0, 0], theta["w2"][1, 0] = 1.0, -1.0
    return theta


def init_theta(rule, seed=0):
    """Freshly initialised meta-weights of `rule` as a dict of NumPy arrays.

    The MLP (every rule): truncated-normal weights, zero biases. Celo's
    scheduler: Haiku's default linear init (truncated normal, std
    `1 / sqrt(fan_in)`), a zero initial LSTM state, and a `step_size` head of
    zero weights and bias `log(10)`, so that `lr_mult = 0.1 * exp(log 10) = 1`
    and phase 2 starts from exactly the phase-1 rule.
    """
    _check_rule(rule)
    rng = np.random.default_rng(seed)
    if rule != "celo":
        return _init_mlp(rng, celo2.THETA_SHAPES)
    theta = {}
    for name, shape in celo.THETA_SHAPES.items():
        leaf = name.rsplit("/", 1)[-1]
        if name.startswith(celo.MLP_PREFIX):
            theta.update(_init_mlp(rng, {name: shape}, celo.MLP_PREFIX))
        elif name.startswith("lstm_init_state") or leaf == "b":
            theta[name] = np.zeros(shape, "float32")
        else:
            theta[name] = _truncated_normal(rng, shape, shape[0])
    theta["rnn_params/step_size/w"] = np.zeros((celo.LSTM_SIZE, 1), "float32")
    theta["rnn_params/step_size/b"] = np.full((1,), np.log(10.0), "float32")
    return theta
