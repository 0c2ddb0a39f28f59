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
