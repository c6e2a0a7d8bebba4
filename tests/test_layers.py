"""The packages import one way: each layer only builds on the ones below it, checked on the source."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What each package may import of dropfleet (besides itself). The core (common/) runs on a board or
# a notebook: no Flower, no networking. fleet/ is what both apps share; the apps sit on top.
ALLOWED = {
    "common.seed": {"common.errors"},
    "common.model": {"common.errors", "common.seed"},
    "common.device": {"common.errors", "common.seed", "common.model"},
    "common.wire": {"common.errors", "common.seed", "common.model", "proto"},
    "common.aggregate": {"common.errors", "common.seed", "common.model"},
    "fleet": {"common", "proto", "fleet"},
    "client": {"common", "proto", "fleet"},
    "server": {"common", "proto", "fleet", "server"},
    "deploy": {"common", "fleet", "deploy", "server"},
}
FLOWER_FREE = ("common",)
# What the server's wire and merge code and a board without torch import: torch may not be reached from
# them, at any depth. torch_model.py is the one torch module of common/model/ (the nn.Module side).
# The lean device runtime (common/device/lean/) is what a board without torch runs. The REST API, the
# run preflight and what fleet/ shares with the apps plan training from closed-form footprints
# (budget.py) and read data files (data_files.py) without torch (numba: tests/server/test_lean_api.py).
TORCH_FREE = (
    "common.seed",
    "common.model",
    "common.wire",
    "common.aggregate",
    "common.device.dropback_core",
    "common.device.streaming_core",
    "common.device.running_topk",
    "common.device.lean",
    "common.device.budget",
    "common.device.data_files",
    "common.device.evaluation",
    "client.round",
    "client.footprint",
    "client.lean",  # a lean board's round (client/app.py imports torch only for the torch runtime)
    "fleet.config",
    "fleet.profiles",
    "fleet.records",
    "fleet.replies",
    "server.preflight",
    "server.api",
)
TORCH_MODULES = ("common/model/torch_model.py",)


def package_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "common" and len(parts) > 2:
        return f"common.{parts[1]}"
    return parts[0]


def imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute, at any depth (lazy imports in functions count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def within(module: str, allowed: set[str]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


SOURCES = sorted(
    p
    for package in ALLOWED
    for p in (ROOT / package.replace(".", "/")).rglob("*.py")
    if "migrations" not in p.parts
)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_one_way(path):
    package = package_of(path)
    own = {package, "common.errors"} if package.startswith("common") else {package}
    bad = []
    for module in imports(path):
        if not module.startswith("dropfleet."):
            if package.startswith(FLOWER_FREE) and module.split(".")[0] in ("flwr", "ray", "fastapi", "grpc"):
                bad.append(module)
            continue
        name = module.removeprefix("dropfleet.")
        if name in ("common", "common.errors") or within(name, own):
            continue
        # `from dropfleet.common.seed import philox` names the module as an attribute of its package
        if not within(name, ALLOWED[package]):
            bad.append(module)
    assert not bad, f"{path.relative_to(ROOT)} ({package}) imports {sorted(bad)}"


def module_file(module: str) -> Path | None:
    """The source of a dropfleet module (None for names that are attributes, not modules)."""
    rel = ROOT / module.removeprefix("dropfleet.").replace(".", "/")
    for candidate in (rel.with_suffix(".py"), rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def torch_chain(path: Path, seen: set[Path]) -> list[str] | None:
    """The import chain from `path` to torch, following dropfleet's own modules and their packages."""
    seen.add(path)
    for module in sorted(imports(path)):
        if module.split(".")[0] == "torch":
            return [module]
        if not module.startswith("dropfleet."):
            continue
        parts = module.split(".")
        # importing a.b.c runs a.b's __init__ too
        for depth in range(2, len(parts) + 1):
            dep = module_file(".".join(parts[:depth]))
            if dep is not None and dep not in seen:
                chain = torch_chain(dep, seen)
                if chain is not None:
                    return [str(dep.relative_to(ROOT)), *chain]
    return None


TORCH_FREE_SOURCES = [
    p
    for p in SOURCES
    if ".".join(p.relative_to(ROOT).with_suffix("").parts).startswith(TORCH_FREE)
    and str(p.relative_to(ROOT)) not in TORCH_MODULES
]


@pytest.mark.parametrize("path", TORCH_FREE_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_torch_free_layers_reach_no_torch(path):
    chain = torch_chain(path, set())
    assert chain is None, f"{path.relative_to(ROOT)} reaches torch: {' -> '.join(chain)}"


def test_the_wire_merge_model_description_and_lean_runtime_work_without_torch():
    # torch set to None in sys.modules makes any `import torch`, however deep or lazy, raise ImportError
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None
        import dropfleet.common.aggregate.merge
        import dropfleet.common.model.arch
        from dropfleet.common.model.layout import model_layout
        from dropfleet.common.model.registry import MODELS
        from dropfleet.common.model.sparse import SparseModel
        from dropfleet.common.wire.codec import decode, encode
        from dropfleet.common.device.lean.network import seeded_network
        import numpy as np
        for model_id in MODELS:
            empty = SparseModel.empty(model_id, 3)
            assert decode(encode(empty)).layout.shapes == model_layout(model_id).shapes
            net = seeded_network(model_id, 3)  # a board without torch: w0, and a training gradient
            assert net.loss_and_grads(np.ones((2, 1, 28, 28), np.float32), np.array([1, 2])) > 0
            assert np.abs(net.grads).sum() > 0
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_every_core_module_is_in_a_layer():
    loose = [p.name for p in (ROOT / "common").glob("*.py") if p.name not in ("__init__.py", "errors.py")]
    assert not loose, f"common/ modules outside a layer: {loose}"


def test_every_package_is_in_the_distribution():
    """A board installs the wheel, not the checkout: a package missing from pyproject's list is
    missing there (the lean runtime's was, until the edge kit's test installed it)."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(setuptools["packages"]), setuptools["package-dir"]
    for package, folder in dirs.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            sub = init.parent.relative_to(ROOT / folder).parts
            assert ".".join([package, *sub]) in listed, f"{init.parent} is not in [tool.setuptools] packages"
