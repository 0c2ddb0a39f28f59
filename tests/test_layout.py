"""The house: one installed namespace, short functions, no import cycles, the daemon apart
from its tools."""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import subprocess
import sys
import zipfile
from collections.abc import Collection
from pathlib import Path

import streamlstm

ROOT = Path(__file__).resolve().parent.parent
TREES = ("streamlstm", "consumers", "training")
#: What only the training extras bring; a serving install has none of them.
PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q")
TRAINING_STACK = ("pandas", "sklearn", "matplotlib", "h5py", "pyarrow", "tqdm")


def _modules() -> list[str]:
    names = ["streamlstm"]
    for info in pkgutil.walk_packages(streamlstm.__path__, "streamlstm."):
        names.append(info.name)
    return names


def _imports(path: Path) -> list[str]:
    package = ".".join(["streamlstm", *path.relative_to(ROOT).parent.parts])
    if package.startswith("streamlstm.streamlstm"):
        package = package.removeprefix("streamlstm.")
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.append(f"{base}.{node.module}" if node.module else base)
            else:
                names.append(node.module or "")
    return names


def test_every_module_has_one_name_and_none_is_top_level_but_streamlstm() -> None:
    for name in _modules():
        importlib.import_module(name)
    files: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if (
            not path
            or not Path(path).is_absolute()
            or not str(Path(path).resolve()).startswith(str(ROOT))
        ):
            continue
        if (ROOT / ".venv") in Path(path).resolve().parents:
            continue  # the editable install's own finder
        if name.split(".")[0] in ("tests", "__main__") or name.startswith("_pytest"):
            continue
        assert name.startswith("streamlstm"), f"{path} imported as top-level {name}"
        real = str(Path(path).resolve())
        assert real not in files, f"{real} imported twice: as {files[real]} and {name}"
        files[real] = name
    # The daemon and the training pipeline are reached under the one namespace.
    assert "streamlstm.consumers.server" in sys.modules
    assert "streamlstm.training.train" in sys.modules
    # Away from the checkout, the folders' own names import nothing.
    code = "import importlib.util as u; print([u.find_spec(m) for m in ('consumers', 'training')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "[None, None]", out.stdout + out.stderr


#: A function's body (its docstring aside) fits on a screen: this many lines.
SCREEN_LINES = 60
#: Functions known to be longer, each at most as long as it is now: they may only
#: shrink, and leave this list once they fit. New code gets no entry.
TOO_LONG = {
    "training/train.py:_fit": 109,
    "consumers/observability/metrics.py:__init__": 66,
    "training/cli.py:_train": 80,
    "consumers/codec/poll.py:decode_poll": 78,
    "consumers/devtools/bench.py:main": 71,
    "training/evaluation.py:evaluate": 69,
    "consumers/devtools/replay.py:replay": 61,
}


def _sources() -> dict[str, Path]:
    """Every module of the three trees by its one name (the symlinks not followed)."""
    out = {}
    for tree in TREES:
        for path in (ROOT / tree).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if path.resolve() != path or (parts[0] == "streamlstm" and len(parts) > 2):
                continue  # streamlstm/consumers and streamlstm/training are the symlinks
            parts = parts[1:] if parts[0] == "streamlstm" else parts
            out[".".join(["streamlstm", *[p for p in parts if p != "__init__"]])] = path
    return out


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    first = body[0]
    if len(body) > 1 and isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        first = body[1]  # the docstring does not count
    return (node.end_lineno or first.lineno) - first.lineno + 1


def test_functions_fit_on_a_screen() -> None:
    # A module's length says little (a table of small functions reads well, one long
    # function does not); a function that fits on a screen can be read at once.
    seen = set()
    for path in _sources().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                key = f"{path.relative_to(ROOT)}:{node.name}"
                limit = TOO_LONG.get(key, SCREEN_LINES)
                seen.add(key)
                assert _body_lines(node) <= limit, f"{key}: {_body_lines(node)} lines > {limit}"
    assert set(TOO_LONG) <= seen, f"gone, so drop from TOO_LONG: {set(TOO_LONG) - seen}"


def _module_imports(path: Path, name: str, known: Collection[str]) -> set[str]:
    """The modules of ``known`` that ``name`` imports when it is imported: its top-level
    imports, not those in functions (run later) or under ``if TYPE_CHECKING``."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for statement in ast.parse(path.read_text()).body:
        if isinstance(statement, ast.If) and "TYPE_CHECKING" in ast.unparse(statement.test):
            continue
        for node in _walk_outside_functions(statement):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    kept = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(kept + ([node.module] if node.module else []))
                found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return (found & set(known)) - {name}


def _walk_outside_functions(node: ast.AST) -> list[ast.AST]:
    """``node`` and what it holds, but not the bodies of functions (run later, if ever)."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
        return []
    found = [node]
    for child in ast.iter_child_nodes(node):
        found += _walk_outside_functions(child)
    return found


def test_no_import_cycles() -> None:
    # A cycle makes import order matter and hides which module is the lower layer.
    sources = _sources()
    assert len(sources) > 50
    graph = {name: _module_imports(path, name, sources) for name, path in sources.items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "import cycle: " + " -> ".join((*path[path.index(name) :], name))
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_the_core_imports_no_io() -> None:
    # The core (model, engine, store, kernels) is pure and synchronous: Kafka, asyncio and
    # Prometheus are the daemon's. Only the CLI reaches the daemon, from inside functions.
    core = [p for p in (ROOT / "streamlstm").glob("*.py") if p.resolve() == p]
    assert len(core) > 15
    banned = ("aiokafka", "asyncio", "prometheus_client", "streamlstm.consumers")
    for path in core:
        for statement in ast.parse(path.read_text()).body:
            for node in _walk_outside_functions(statement):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                for name in names:
                    assert not name.startswith(banned), f"{path.name} imports {name}"


def test_the_daemon_imports_no_dev_tool_and_no_training_code() -> None:
    daemon = [p for p in (ROOT / "consumers").glob("*.py")]
    assert len(daemon) > 5
    for path in daemon:
        for name in _imports(path):
            assert not name.startswith("streamlstm.consumers.devtools"), f"{path.name}: {name}"
            assert not name.startswith("streamlstm.training"), f"{path.name}: {name}"
            assert name.split(".")[0] not in TRAINING_STACK, f"{path.name}: {name}"


def test_serving_runs_without_the_training_stack() -> None:
    # Any import of the training extras fails in this interpreter, as in a
    # base install: `serve --help` and the whole daemon must not need them.
    code = f"""
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TRAINING_STACK!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Refuse())
import streamlstm.consumers.server, streamlstm.consumers.cli
from streamlstm.cli import main
try:
    main(["serve", "--help"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
loaded = [m for m in {TRAINING_STACK!r} if m in sys.modules]
assert not loaded, loaded
code = main(["train", "--data", "x.csv", "--features", "a", "--out", "m"])
sys.exit(code)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert "--bootstrap-servers" in out.stdout
    # A training command says which extra to install instead of a traceback.
    assert out.returncode == 1, out.stderr
    assert "pip install 'streamlstm[train]'" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_built_wheel_holds_only_the_streamlstm_namespace(tmp_path: Path) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run(
        [*PIP_WHEEL, "-w", str(tmp_path), str(ROOT)],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("streamlstm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"streamlstm"}
    assert "streamlstm/consumers/server.py" in names
    assert "streamlstm/consumers/devtools/bench.py" in names
    assert "streamlstm/training/train.py" in names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [
        line.split(":", 1)[1].strip()
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    base = [r for r in requires if "extra ==" not in r]
    for package in ("pandas", "scikit-learn", "matplotlib", "h5py", "pyarrow"):
        assert not any(r.startswith(package) for r in base), base


def _imported_test_modules(source: str) -> list[str]:
    """The ``test_*`` modules that ``source`` imports (absolute or relative, any form)."""

    def is_test(module: str) -> bool:
        return any(part.startswith("test_") for part in module.split("."))

    names: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names if is_test(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if is_test(module):
                names.append(module)
            elif node.level or module.split(".")[0] == "tests":  # a module of tests/
                dot = "" if module.endswith(".") else "."
                names += [f"{module}{dot}{a.name}" for a in node.names if is_test(a.name)]
    return names


def test_no_test_module_imports_another_test_module() -> None:
    # Shared helpers live in tests/helpers/ (or are conftest.py fixtures): a test module
    # that imports another runs the other's tests' module-level code, and breaks with it.
    paths = sorted((ROOT / "tests").rglob("*.py"))
    assert len(paths) > 40
    found = {str(p.relative_to(ROOT)): _imported_test_modules(p.read_text()) for p in paths}
    assert {path: names for path, names in found.items() if names} == {}
    # The check sees each form of such an import, and only those.
    forms = [
        "from tests.a.test_b import c",
        "from .test_b import c",
        "from . import test_b",
        "from tests.a import test_b",
        "import tests.a.test_b",
        "from streamlstm import test_data",
    ]
    assert _imported_test_modules("\n".join(forms)) == [
        "tests.a.test_b",
        ".test_b",
        ".test_b",
        "tests.a.test_b",
        "tests.a.test_b",
    ]
