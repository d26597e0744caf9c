"""Imports go one way: host root -> readers -> facts -> checks -> report -> renderers and
gate, with the daemon and the commands on top (README.md, "Layout").

Every module's layer comes from its folder or file name; every import in it (at the
top, in a function, under TYPE_CHECKING) is read with `ast`. A module may import its
own layer and the layers below, never one above. A module missing from LAYERS fails
too: a new folder or top-level module says where it stands.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tdx_preflight"

#: Lowest first. The key is a module's first name below the package (its folder, or its
#: file without .py); "" is the package's own __init__ (the version).
ORDER: list[tuple[str, tuple[str, ...]]] = [
    ("host", ("", "host")),
    ("readers", ("readers",)),
    ("facts", ("facts",)),
    ("checks", ("checks",)),
    ("policy", ("policy",)),
    # The published JSON Schemas describe the report: data only, no imports of the package.
    ("report", ("report", "schema")),
    # What takes a report or the checks' phases further: output, the gate, snapshots.
    ("renderers and gate", ("render", "metrics", "gate", "kexec_args", "snapshot")),
    ("daemon", ("daemon",)),
    # __main__ is the console entry: it turns the cycle collector off and calls cli.main.
    ("commands", ("cli", "integrations", "__main__")),
]
LAYERS = {name: rank for rank, (_, names) in enumerate(ORDER) for name in names}

#: Within the host layer (the package tdx_preflight/host/), lowest first: the same rule
#: one level down. "" is the package's __init__, which gathers the names the layers
#: above import; no module of the package imports it back.
HOST_ORDER: list[tuple[str, ...]] = [
    ("problem", "limits"),
    ("openat2", "kallsyms"),
    ("root",),
    ("",),
]
HOST_LAYERS = {name: rank for rank, names in enumerate(HOST_ORDER) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer_key(module: str) -> str:
    """`tdx_preflight.readers.kvm` -> "readers"; `tdx_preflight` -> ""."""
    parts = module.split(".")
    assert parts[0] == "tdx_preflight", module
    return parts[1] if len(parts) > 1 else ""


def _is_module(dotted: str) -> bool:
    where = PACKAGE.parent.joinpath(*dotted.split("."))
    return where.is_dir() or where.with_suffix(".py").is_file()


def _imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, module) of every import of the package in the file, relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    text = path.read_text(encoding="utf-8") if source is None else source
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None:
                # `from . import x`: x is a module of its own, or a name of the package.
                found += [
                    (
                        node.lineno,
                        f"{target}.{a.name}" if _is_module(f"{target}.{a.name}") else target,
                    )
                    for a in node.names
                ]
            else:
                found.append((node.lineno, target))
    return [(line, m) for line, m in found if m.split(".")[0] == "tdx_preflight"]


def _layer_of(module: str) -> int | None:
    return LAYERS.get(_layer_key(module))


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_has_modules() -> None:
    assert len(MODULES) > 30
    assert {_layer_key(_module_name(p)) for p in MODULES} >= {"readers", "checks", "daemon"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down(path: Path) -> None:
    module = _module_name(path)
    key = _layer_key(module)
    assert key in LAYERS, f"{module}: no layer in tests/test_layers.py ORDER; add it"
    mine = LAYERS[key]
    upward = []
    for line, target in _imports(path):
        theirs = _layer_of(target)
        assert theirs is not None, f"{path.name}:{line}: {target} has no layer"
        if theirs > mine:
            upward.append(
                f"{path.relative_to(PACKAGE)}:{line} imports {target} "
                f"({ORDER[mine][0]} must not import {ORDER[theirs][0]})"
            )
    assert not upward, "\n".join(upward)


HOST_MODULES = [p for p in MODULES if _layer_key(_module_name(p)) == "host"]


def _host_key(module: str) -> str:
    """`tdx_preflight.host.root` -> "root"; `tdx_preflight.host` -> ""."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else ""


@pytest.mark.parametrize("path", HOST_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_host_modules_import_down(path: Path) -> None:
    key = _host_key(_module_name(path))
    assert key in HOST_LAYERS, f"{path.name}: no place in tests/test_layers.py HOST_ORDER"
    upward = []
    for line, target in _imports(path):
        if target == "tdx_preflight":
            continue  # the version: below everything
        assert target.split(".")[:2] == ["tdx_preflight", "host"], f"{path.name}:{line}: {target}"
        theirs = HOST_LAYERS.get(_host_key(target))
        assert theirs is not None, f"{path.name}:{line}: {target} has no place in HOST_ORDER"
        if theirs > HOST_LAYERS[key]:
            upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
    assert not upward, "\n".join(upward)


def test_the_host_layer_is_a_package_of_small_modules() -> None:
    assert {_host_key(_module_name(p)) for p in HOST_MODULES} == set(HOST_LAYERS)


def test_an_upward_import_is_caught() -> None:
    # The rule itself: a reader importing the report inside a function is found.
    source = "def f():\n    from ..report import Report\n    from .. import __version__, host\n"
    found = _imports(PACKAGE / "readers" / "example.py", source)
    assert [m for _, m in found] == ["tdx_preflight.report", "tdx_preflight", "tdx_preflight.host"]
    assert _layer_of("tdx_preflight.report") > LAYERS["readers"]
    assert _layer_of("tdx_preflight") == _layer_of("tdx_preflight.host") == 0


def _string_annotated_records(path: Path, source: str | None = None) -> list[str]:
    """Where a module makes typing.NamedTuple compile annotations (see the test below):
    a field of a NamedTuple class (`NamedTuple`, `typing.NamedTuple` or an alias of it)
    or of the functional form whose annotation is, or holds, a string, and every field
    of such a class in a module with `from __future__ import annotations`."""
    tree = ast.parse(source if source is not None else path.read_text())
    future = False
    aliases = {"NamedTuple"}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            future = future or any(a.name == "annotations" for a in node.names)
        if isinstance(node, ast.ImportFrom) and node.module == "typing":
            aliases.update(a.asname or a.name for a in node.names if a.name == "NamedTuple")

    def is_named_tuple(expr: ast.expr) -> bool:
        if isinstance(expr, ast.Attribute):
            return expr.attr == "NamedTuple"
        return isinstance(expr, ast.Name) and expr.id in aliases

    def has_string(expr: ast.expr) -> bool:
        """A string in the annotation that typing would compile (a Literal's are values)."""
        if isinstance(expr, ast.Constant):
            return isinstance(expr.value, str)
        if isinstance(expr, ast.Subscript):
            head = expr.value
            name = head.attr if isinstance(head, ast.Attribute) else getattr(head, "id", "")
            if name == "Literal":
                return False
        return any(has_string(child) for child in ast.iter_child_nodes(expr))

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(map(is_named_tuple, node.bases)):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and (future or has_string(item.annotation)):
                    found.append(f"{path.name}:{item.lineno} ({node.name})")
        elif isinstance(node, ast.Call) and is_named_tuple(node.func) and len(node.args) > 1:
            fields = node.args[1]
            if isinstance(fields, (ast.List, ast.Tuple)) and any(
                isinstance(f, ast.Tuple) and len(f.elts) == 2 and has_string(f.elts[1])
                for f in fields.elts
            ):
                found.append(f"{path.name}:{node.lineno} (functional NamedTuple)")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_record_fields_are_not_string_annotations(path: Path) -> None:
    # typing.NamedTuple turns a string annotation into a ForwardRef by compiling it: with
    # `from __future__ import annotations` every field is one, and the 34 record classes
    # a check imports took about 4 ms more (README.md "Performance").
    assert not _string_annotated_records(path)


@pytest.mark.parametrize(
    "source",
    [
        "from typing import NamedTuple\n\nclass R(NamedTuple):\n    a: 'int'\n",
        "from typing import NamedTuple\n\nclass R(NamedTuple):\n    a: list['int']\n",
        "import typing\n\nclass R(typing.NamedTuple):\n    a: 'int'\n",
        "from typing import NamedTuple as NT\n\nclass R(NT):\n    a: 'int'\n",
        "from __future__ import annotations\nfrom typing import NamedTuple\n\n"
        "class R(NamedTuple):\n    a: int\n",
        "from typing import NamedTuple\n\nR = NamedTuple('R', [('a', 'int')])\n",
    ],
)
def test_a_string_annotated_record_is_caught(source: str) -> None:
    assert _string_annotated_records(PACKAGE / "r.py", source)


def test_a_record_of_real_types_and_literals_passes() -> None:
    plain = (
        "from typing import Literal, NamedTuple\n\n"
        "class R(NamedTuple):\n    a: int | None\n    b: Literal['td', 'vm']\n"
    )
    assert not _string_annotated_records(PACKAGE / "r.py", plain)
