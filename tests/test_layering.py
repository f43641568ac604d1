"""The import layering README states: no cycles in taro_vllm, the routing core one way (features -> router, mix; mix
never imports the router), assets at the bottom, only taro_vllm/serving imports vllm, and taro_vllm never imports
router_training (which imports taro_vllm). Static (ast: every import statement, also those inside functions and
``if TYPE_CHECKING:`` blocks, which is where import loops hide) plus a real import with router_training blocked."""

import ast
import importlib.metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "taro_vllm"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path) -> set[str]:
    """Every module an import statement anywhere in the file names (``from a import b`` names a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the checks below read absolute names)"
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def internal_graph() -> dict[str, set[str]]:
    return {m: {n for n in imported_names(p) if n in MODULES and n != m} for m, p in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_taro_vllm_has_no_import_cycle():
    assert find_cycle(internal_graph()) is None, " -> ".join(find_cycle(internal_graph()))


@pytest.mark.parametrize("module,forbidden", [
    ("taro_vllm.mix", {"taro_vllm.router", "taro_vllm.checkpoint"}),
    ("taro_vllm.features", {"taro_vllm.router", "taro_vllm.mix", "taro_vllm.checkpoint"}),
    ("taro_vllm.router", {"taro_vllm.mix", "taro_vllm.checkpoint"}),
    ("taro_vllm.assets", {"taro_vllm.router", "taro_vllm.checkpoint", "taro_vllm.mix", "taro_vllm.features"}),
])
def test_the_routing_core_imports_one_way(module, forbidden):
    assert not imported_names(MODULES[module]) & forbidden


def test_assets_model_files_and_the_kernels_import_nothing_of_taro_vllm_but_the_environment_table():
    """envs.py (every environment variable, one table) is the bottom layer: it imports nothing of taro_vllm."""
    assert not {n for n in imported_names(MODULES["taro_vllm.envs"]) if n.startswith("taro_vllm")}
    for m in ("taro_vllm.assets", "taro_vllm.model_files", "taro_vllm.mix_triton"):
        assert not {n for n in imported_names(MODULES[m]) if n.startswith("taro_vllm")} - {"taro_vllm", "taro_vllm.envs"}, m


def test_the_environment_is_read_and_set_only_in_the_environment_table():
    """No module but envs.py touches os.environ / os.getenv (subprocess env= copies aside): one table to read."""
    for root in (PACKAGE, ROOT / "router_training", ROOT / "benchmarks"):
        for path in sorted(root.rglob("*.py")):
            if path.name == "envs.py":
                continue
            text = path.read_text()
            for needle in ("os.environ.setdefault", "os.environ.get", "os.environ[", "os.getenv"):
                assert needle not in text, f"{path}: {needle} (put it in taro_vllm/envs.py)"


def test_only_serving_imports_vllm_and_nothing_imports_router_training():
    for m, p in MODULES.items():
        names = {n.split(".")[0] for n in imported_names(p)}
        assert "router_training" not in names, m
        if not m.startswith("taro_vllm.serving"):
            assert "vllm" not in names, m


IMPORT_EACH = """
import importlib, json, sys
sys.modules["router_training"] = None  # any import of it raises ImportError
failed = {}
for m in json.loads(sys.argv[1]):
    for k in [k for k in sys.modules if k == "taro_vllm" or k.startswith("taro_vllm.")]:
        del sys.modules[k]  # each module imported first, as in a fresh interpreter (torch stays loaded)
    try:
        importlib.import_module(m)
    except Exception as e:
        failed[m] = repr(e)
print(json.dumps({"failed": failed, "vllm": sorted(k for k in sys.modules if k.split(".")[0] == "vllm")}))
"""


def test_each_module_outside_serving_imports_first_without_router_training_or_vllm():
    core = [m for m in MODULES if not m.startswith("taro_vllm.serving")]
    out = subprocess.run([sys.executable, "-c", IMPORT_EACH, json.dumps(core)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"failed": {}, "vllm": []}


def test_taro_vllm_train_is_the_trainers_registered_command(monkeypatch, capsys):
    """`taro-vllm train` dispatches through the taro_vllm.commands entry point pyproject.toml declares (read at call
    time: cli.py never imports router_training); the same target is the taro-vllm-train console script."""
    from taro_vllm import cli

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["entry-points"][cli.COMMANDS_GROUP]["train"]
    assert target == project["scripts"]["taro-vllm-train"] == "router_training.__main__:main"
    registered = [importlib.metadata.EntryPoint(name="train", value=target, group=cli.COMMANDS_GROUP)]
    # Other libraries look up their own groups (no name) meanwhile: answer those with nothing.
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None, name=None: [ep for ep in registered if ep.group == group
                                                       and name in (None, ep.name)])
    assert cli.main(["train", "--help"]) == 0
    assert "python -m router_training" in capsys.readouterr().out
    registered.clear()  # an install from before the entry point: a clear error, not a traceback
    assert cli.main(["train", "reward"]) == 2
    assert "python -m router_training" in capsys.readouterr().err
