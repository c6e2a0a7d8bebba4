"""The packages import one way: each layer only builds on the ones below it, checked on the source."""

import ast
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


def test_every_core_module_is_in_a_layer():
    loose = [p.name for p in (ROOT / "common").glob("*.py") if p.name not in ("__init__.py", "errors.py")]
    assert not loose, f"common/ modules outside a layer: {loose}"
