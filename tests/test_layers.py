"""The import graph: the training wing (training/) imports the runtime; the runtime (nextgpt/, tools/,
assistant/, bots/, memory/) imports nothing from the wing, not even lazily inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ("nextgpt", "tools", "assistant", "bots", "memory")


def _runtime_files() -> list[Path]:
    return sorted(p for pkg in RUNTIME for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def _upward(path: Path) -> list[str]:
    """Every place in `path` that imports the training wing: import statements anywhere (top level or
    inside functions) and importlib.import_module / __import__ calls with a literal name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "training"]
    return found


def test_the_runtime_imports_nothing_from_the_training_wing():
    files = _runtime_files()
    assert len(files) > 40  # the walk found the packages
    assert [hit for path in files for hit in _upward(path)] == []


def test_the_checker_sees_lazy_and_dynamic_imports(tmp_path):
    probe = ROOT / "tests" / "_layers_probe.py"  # inside ROOT so relative_to works; removed at once
    probe.write_text("def f():\n    from training.stages import main\n    import training\n"
                     "    import importlib\n    importlib.import_module('training.cli')\n    from trainingwheels import x\n")  # fmt: skip
    try:
        assert [h.split(" imports ")[1] for h in _upward(probe)] == ["training.stages", "training", "training.cli"]
    finally:
        probe.unlink()


def test_the_wing_is_only_registered_not_imported():
    """`nextgpt train|eval` and `export --official` reach the wing through the `nextgpt.training`
    entry points; the installed metadata carries the same table as pyproject.toml (a stale install,
    e.g. an old nextgpt.egg-info in the working folder, would hide the commands)."""
    from importlib.metadata import entry_points

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["nextgpt.training"]
    installed = {ep.name: ep.value for ep in entry_points(group="nextgpt.training")}
    assert installed == declared, "reinstall the package (make setup / pip install -e .): its entry points are stale"
    assert set(declared) == {"train", "eval", "export-official"}
    for value in declared.values():
        assert value.startswith("training.")


_BLOCKED_IMPORT = r"""
import importlib, pkgutil, sys

class NoTraining:
    def find_spec(self, name, path=None, target=None):
        if name == "training" or name.startswith("training."):
            raise ImportError(f"the runtime imported {name}")
        return None

sys.meta_path.insert(0, NoTraining())
names = []
for pkg in PACKAGES:
    mod = importlib.import_module(pkg)
    names.append(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        if info.name.endswith("__main__") or ".migrations" in info.name:  # alembic runs those itself
            continue
        importlib.import_module(info.name)
        names.append(info.name)
assert not [m for m in sys.modules if m == "training" or m.startswith("training.")]
print(len(names))
"""


def test_the_runtime_imports_without_the_training_wing():
    """Every runtime module imports in a fresh interpreter where `training` cannot be imported."""
    code = f"PACKAGES = {RUNTIME!r}\n" + _BLOCKED_IMPORT
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) > 40


def test_message_types_are_torch_free():
    """Front ends import `Message` / `MediaInput` at the top without loading torch; `nextgpt.model`
    re-exports the same classes; templates.py imports them without a circle through model.py."""
    code = ("import sys\nfrom nextgpt.messages import MediaInput, Message\nimport nextgpt.templates\n"
            "assert 'torch' not in sys.modules and 'nextgpt.model' not in sys.modules, sorted(sys.modules)\n"
            "import nextgpt.model\nassert nextgpt.model.Message is Message and nextgpt.model.MediaInput is MediaInput\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    src = (ROOT / "nextgpt" / "templates.py").read_text()
    assert "nextgpt.model" not in src


def test_without_the_wing_train_is_a_one_line_error(monkeypatch, capsys):
    """A runtime installed without the training wing's entry points: `nextgpt train` says what to do."""
    import importlib.metadata

    from bots.cli import main

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: ())
    assert main(["train", "--stage", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nextgpt: error: `train` comes from the training wing") and "pip install -e ." in err
