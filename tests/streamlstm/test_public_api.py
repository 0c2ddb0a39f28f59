import ast
import subprocess
import sys
from pathlib import Path

import streamlstm


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in dir(streamlstm) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(streamlstm, name)).__name__ == "module"}
    assert set(streamlstm.__all__) - {"__version__"} == public - modules
    for name in streamlstm.__all__:
        assert hasattr(streamlstm, name), name


def test_core_imports_no_kafka_and_no_asyncio() -> None:
    code = (
        "import sys, streamlstm, streamlstm.cli, streamlstm.bench\n"
        "bad = [m for m in ('aiokafka', 'streamlstm.consumers', 'streamlstm.training')"
        " if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


#: Run in a fresh interpreter where importing torch fails, as in a serving install.
_WITHOUT_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed (blocked by the test)")
        return None
sys.meta_path.insert(0, NoTorch())
"""


def test_serving_never_imports_torch(tmp_path: Path) -> None:
    # What a serving install runs: the engine, a bundle saved and loaded, the C
    # step, the daemon's modules and CLI help, with torch unimportable.
    code = _WITHOUT_TORCH + (
        "import numpy as np\n"
        "import streamlstm, streamlstm.cli, streamlstm.bench\n"
        "from streamlstm.consumers import server, cli\n"
        "from streamlstm.consumers.engine import child\n"
        "from streamlstm import Bundle, Engine, ModelConfig, DependencyError\n"
        f"path = Bundle.random(ModelConfig(input_size=2), seed=1).save({str(tmp_path)!r})\n"
        "engine = Engine(Bundle.load(path))\n"
        "assert engine.native\n"
        "out = engine.step(['a', 'b', 'a'], np.ones((3, 2), np.float32))\n"
        "assert np.isfinite(out.predictions).all()\n"
        "try:\n"
        "    Bundle.load(path).predict_sequence(np.ones((2, 2), np.float32))\n"
        "except DependencyError as exc:\n"
        "    assert \"pip install 'streamlstm[train]'\" in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('predict_sequence ran without torch')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    for argv in (["--help"], ["serve", "--help"]):
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                _WITHOUT_TORCH + "from streamlstm.cli import main; main()",
                *argv,
            ],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr
        assert "usage" in run.stdout.lower()


def test_errors_share_one_root() -> None:
    for name in ("BundleError", "ConfigError", "InputError", "StateError", "BrokerError"):
        assert issubclass(getattr(streamlstm, name), streamlstm.StreamLSTMError)


def test_core_source_never_imports_io_packages() -> None:
    # torch itself imports asyncio, so purity is checked on our own source.
    banned = ("asyncio", "aiokafka", "streamlstm.consumers", "streamlstm.training")
    for path in Path(streamlstm.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                # A relative import within the core names a sibling: ".consumers" -> ours.
                prefix = "streamlstm." if node.level else ""
                names = [prefix + (node.module or "")]
            else:
                continue
            for name in names:
                bad = [b for b in banned if name == b or name.startswith(b + ".")]
                assert not bad, f"{path.name} imports {name}"
