"""The package as a new user meets it: imports, registration, no cycles."""

import ast
import os
import subprocess
import sys

import keras
import pytest

import keras_lopt

from tests.conftest import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, "keras_lopt")


def _module_name(path):
    rel = os.path.relpath(path, REPO_ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph():
    """`{module: {keras_lopt modules it imports}}`, from every import
    statement, including those inside functions."""
    modules = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                modules[_module_name(path)] = path
    graph = {}
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        tree = ast.parse(open(path).read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = module.split(".")
                    parts = parts if is_package else parts[:-1]
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                # `from pkg import sub` imports the module pkg.sub if it is one.
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                         for a in node.names]
            else:
                continue
            for dep in names:
                while dep and dep not in modules:
                    dep = dep.rpartition(".")[0]
                if dep and dep != module:
                    deps.add(dep)
        graph[module] = deps
    return graph


def find_cycles(graph):
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return groups


def test_no_import_cycles_inside_the_package():
    graph = import_graph()
    assert "keras_lopt.rules.routing" in graph and "keras_lopt.meta.pes" in graph
    # A package's __init__ importing its own modules is not a cycle of logic;
    # every other edge counts.
    def below(module, dep):
        return dep.startswith(module + ".")

    trimmed = {m: {d for d in deps if not below(m, d)} for m, deps in graph.items()}
    assert find_cycles(trimmed) == []
    # The checker does see a cycle when there is one.
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def _python(code, tmp_path):
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_saved_models_load_in_a_new_process_after_import_keras_lopt(tmp_path):
    """`import keras_lopt` alone registers the optimizers, models and layers."""
    save = f"""
import sys; sys.path.insert(0, {REPO_ROOT!r})
import numpy as np, keras, keras_lopt
x = np.random.default_rng(0).standard_normal((16, 4)).astype("float32")
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
model.compile(optimizer=keras_lopt.optimizers.Celo2(exclude_layers="dense"), loss="mse")
model.fit(x, x[:, :3], epochs=1, verbose=0)
model.save("celo2.keras")
lm = keras_lopt.models.Mamba2LM(vocab_size=11, num_layers=1, hidden_dim=16,
                                mixer_config=dict(d_state=4, head_dim=8, chunk_size=4))
tokens = np.arange(8, dtype="int32").reshape(1, 8) % 11
lm.compile(optimizer=keras_lopt.optimizers.Celo(total_steps=3), loss="mse")
np.save("logits.npy", keras.ops.convert_to_numpy(lm(tokens)))
lm.save("lm.keras")
"""
    _python(save, tmp_path)
    load = f"""
import sys; sys.path.insert(0, {REPO_ROOT!r})
import numpy as np, keras, keras_lopt
model = keras.models.load_model("celo2.keras")
assert type(model.optimizer).__name__ == "Celo2", model.optimizer
assert model.optimizer.exclude_layers == ["dense"]
lm = keras.models.load_model("lm.keras")
assert type(lm).__name__ == "Mamba2LM"
assert type(lm.optimizer).__name__ == "Celo" and lm.optimizer.horizon == 3
tokens = np.arange(8, dtype="int32").reshape(1, 8) % 11
np.testing.assert_allclose(keras.ops.convert_to_numpy(lm(tokens)), np.load("logits.npy"),
                           rtol=1e-5, atol=1e-6)
print("ok")
"""
    assert "ok" in _python(load, tmp_path)


def test_import_needs_no_other_framework(tmp_path):
    """Only Keras (and what Keras itself loads) and NumPy: `import keras_lopt`
    imports no framework that `import keras` did not (the meta-trainer
    imports JAX when it is used)."""
    out = _python(
        f"import sys; sys.path.insert(0, {REPO_ROOT!r})\n"
        "frameworks = ('jax', 'tensorflow', 'torch', 'sklearn', 'matplotlib', 'keras_hub')\n"
        "import keras\n"
        "before = {m for m in frameworks if m in sys.modules}\n"
        "import keras_lopt\n"
        "print(sorted(m for m in frameworks if m in sys.modules and m not in before))",
        tmp_path,
    )
    assert out.strip() == "[]", out


def test_command_line_defaults_to_jax_before_keras_loads(tmp_path):
    """`python -m keras_lopt.cli` imports the package (and so Keras) first:
    without KERAS_BACKEND it must still run on JAX, even where TensorFlow
    (Keras's own default) is not installed."""
    stub = tmp_path / "stub" / "tensorflow"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('tensorflow is not installed here')\n")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "stub"), REPO_ROOT])
    proc = subprocess.run([sys.executable, "-m", "keras_lopt.cli", "meta-train", "--help"],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "usage: keras-lopt" in proc.stdout, proc.stderr[-3000:]
    # A backend asked for explicitly is not overridden.
    env["KERAS_BACKEND"] = "torch"
    proc = subprocess.run([sys.executable, "-m", "keras_lopt.cli", "meta-train", "--out", "x",
                           "--iterations", "1"], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "needs the JAX backend" in proc.stderr


@pytest.mark.parametrize("backend", ["jax", "tensorflow", "torch"])
def test_command_line_help_and_version_on_every_backend(backend):
    """Only running meta-training needs JAX; --help shows every default."""
    env = dict(os.environ, KERAS_BACKEND=backend)
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "keras_lopt.cli", *args], env=env,
        capture_output=True, text=True, timeout=300)
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"keras-lopt {keras_lopt.__version__}"
    proc = run("meta-train", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = "".join(proc.stdout.split())  # argparse wraps even inside words
    assert "(default:8)" in text and "(default:digits_deep_mlp," in text
    assert "(default:None)" not in text


def test_packaging_metadata_is_consistent():
    """The torch extra and `make install` pin the same CPU wheel; the
    license the metadata names ships as a file."""
    import re
    import tomllib

    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    with open(os.path.join(REPO_ROOT, "Makefile")) as f:
        make_pin = re.search(r"^TORCH_PIN \?= (\S+)$", f.read(), re.M).group(1)
    assert project["optional-dependencies"]["torch"] == [make_pin]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    with open(os.path.join(REPO_ROOT, "LICENSE")) as f:
        assert "Apache License" in f.readline() + f.readline()
    assert "matplotlib" in project["optional-dependencies"]["meta"]
