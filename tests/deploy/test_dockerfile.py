"""deploy/Dockerfile's build context: what it copies exists and passes .dockerignore.

Static (no Docker engine here): a renamed or new top-level package that the
wheel needs, and the Dockerfile or .dockerignore forgot, fails here.
"""

from __future__ import annotations

import fnmatch
import re

from tests.deploy.conftest import DEPLOY, ROOT

DOCKERFILE = (DEPLOY / "Dockerfile").read_text()


def _copied() -> list[str]:
    """The build-context sources of every COPY without --from."""
    sources = []
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            sources += words[:-1]
    return sources


def _included(path: str) -> bool:
    """Whether .dockerignore lets ``path`` into the context (last matching rule wins)."""
    included = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/").removeprefix("**/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path.split("/")[0], pattern):
            included = negate
    return included


def test_every_copied_path_exists_and_is_in_the_context() -> None:
    sources = _copied()
    assert {"pyproject.toml", "setup.py", "streamlstm/"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such path"
        assert _included(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"


def test_the_packages_mapped_into_streamlstm_are_copied() -> None:
    # streamlstm/consumers -> ../consumers etc.: the wheel follows those links.
    copied = {s.rstrip("/") for s in _copied()}
    for link in (ROOT / "streamlstm").iterdir():
        if link.is_symlink():
            target = link.resolve().relative_to(ROOT)
            assert str(target) in copied, f"{link.name} -> {target} is not copied"


def test_readme_is_in_the_context() -> None:
    # pyproject.toml names it as the readme: the wheel build reads it.
    assert 'readme = "README.md"' in (ROOT / "pyproject.toml").read_text()
    assert "README.md" in _copied()


def test_runtime_stage_runs_as_non_root_with_a_healthcheck() -> None:
    runtime = DOCKERFILE[DOCKERFILE.index("AS runtime") :]
    assert re.search(r"^USER 10001:10001$", runtime, re.M)
    assert "HEALTHCHECK" in runtime and "/healthz" in runtime
    assert re.search(r"^EXPOSE 9464$", runtime, re.M)
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "streamlstm"]' in runtime
