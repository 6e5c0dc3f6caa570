"""The rule of the house: the site wing and the server wing never import each other.

Both import only ``core/`` and ``data/``. Checked twice: statically, on every
import statement of the package (lazy ones too), and in a fresh interpreter, on
what importing each app really loads.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flower_medimg"
SITE_WING = ("flower_medimg.client_apps", "flower_medimg.privacy")
SERVER_WING = (
    "flower_medimg.strategies",
    "flower_medimg.lifecycle",
    "flower_medimg.server_app",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names (absolute names)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def _inside(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


@pytest.mark.parametrize(
    ("wing", "forbidden"), [(SITE_WING, SERVER_WING), (SERVER_WING, SITE_WING)]
)
def test_no_import_statement_crosses_the_wings(wing, forbidden):
    crossings = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if not _inside(_module_name(path), wing):
            continue
        crossings += [
            f"{path.relative_to(PACKAGE.parent)} imports {name}"
            for name in sorted(_imports(path))
            if _inside(name, forbidden)
        ]
    assert crossings == []


def test_core_and_data_import_neither_wing():
    crossings = []
    for folder in ("core", "data"):
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            crossings += [
                f"{path.name} imports {name}"
                for name in sorted(_imports(path))
                if _inside(name, SITE_WING + SERVER_WING)
            ]
    assert crossings == []


# A fresh interpreter imports one app and reports which of our modules it loaded,
# and which module imported opacus or matplotlib (MONAI itself imports
# matplotlib.pyplot whenever matplotlib is installed).
_PROBE = """
import importlib.abc, json, sys

importers = {}

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ("opacus", "matplotlib") and top not in importers:
            frame = sys._getframe(1)
            while frame is not None:
                module = frame.f_globals.get("__name__", "")
                if not module.startswith(("importlib", "_frozen")):
                    break
                frame = frame.f_back
            importers[top] = module
        return None

sys.meta_path.insert(0, Watch())
import {target}
print(json.dumps({
    "ours": sorted(m for m in sys.modules if m.startswith("flower_medimg")),
    "importers": importers,
}))
"""


def _loaded(target: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.replace("{target}", target)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("target", "forbidden"),
    [
        ("flower_medimg.client_apps", SERVER_WING),
        ("flower_medimg.server_app", SITE_WING),
    ],
)
def test_importing_an_app_loads_nothing_of_the_other_wing(target, forbidden):
    loaded = _loaded(target)
    assert [m for m in loaded["ours"] if _inside(m, forbidden)] == []
    # opacus only when DP is on; matplotlib (plots) never from our code
    assert "opacus" not in loaded["importers"], loaded["importers"]
    assert not str(loaded["importers"].get("matplotlib", "")).startswith(
        "flower_medimg"
    ), loaded["importers"]
