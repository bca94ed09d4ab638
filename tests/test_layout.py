"""The house rules of the layout (docs/layout.md), read off the source with ``ast``:
nothing under kernels/ imports internvit_fast; no module of the package, the kernels, the
tools, the benchmarks or the tests imports a private (``_name``) function or class of another
of the project's modules; no import circles among the project's modules; only internvit_fast/mmseg/
imports mmseg, mmcv or mmengine; the wheel's package list holds no developer tool."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOMS = ("internvit_fast", "kernels", "tools", "benchmarks", "tests")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    if rel.startswith("kernels"):
        rel = "internvit_fast." + rel  # installed as internvit_fast.kernels
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def sources():
    out = {}
    for room in ROOMS:
        for folder, dirs, files in os.walk(os.path.join(ROOT, room)):
            if os.path.islink(folder) or "__pycache__" in folder:
                continue
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    out[module_name(path)] = path
    return out


MODULES = sources()


def imports(name: str, path: str):
    """(imported module, imported names, line) for every import in the file, relative ones resolved."""
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            yield base, [a.name for a in node.names], node.lineno


def project_target(mod: str, names):
    """The project modules an import statement reaches: the module itself and, for
    ``from package import name``, the submodules it names."""
    out = []
    if mod in MODULES:
        out.append(mod)
    for n in names:
        if f"{mod}.{n}" in MODULES:
            out.append(f"{mod}.{n}")
    return out


def test_the_rooms_exist():
    for m in ("internvit_fast.model", "internvit_fast.fast_path", "internvit_fast.checkpoint.loader",
              "internvit_fast.checkpoint.safe_pickle", "internvit_fast.checkpoint.dcp",
              "internvit_fast.segmentation.segmentor", "internvit_fast.mmseg.backbone", "internvit_fast.mmseg.cli",
              "internvit_fast.cli.images", "tools.gate", "tools.costs", "tools.ptx_eval"):
        assert m in MODULES, m


def test_kernels_import_nothing_from_the_package_that_uses_them():
    bad = [(n, mod, line) for n, p in MODULES.items() if n.startswith("internvit_fast.kernels")
           for mod, _, line in imports(n, p)
           if mod.startswith(("internvit_fast", "tools", "benchmarks")) and not mod.startswith("internvit_fast.kernels")]
    assert not bad, bad


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for n, p in MODULES.items():
        for mod, names, line in imports(n, p):
            if not project_target(mod, []) and not any(f"{mod}.{x}" in MODULES for x in names):
                continue  # not the project's
            for x in names:
                if x.startswith("_") and not x.startswith("__") and f"{mod}.{x}" not in MODULES and mod != n:
                    bad.append(f"{p}:{line}: {x} from {mod}")
    assert not bad, bad


def test_no_attribute_that_is_private_is_read_across_modules():
    """``module._name`` on an imported project module (the same rule, through an attribute)."""
    bad = []
    for n, p in MODULES.items():
        src = open(p).read()
        aliases = {}
        for mod, names, _ in imports(n, p):
            for x in names:
                if f"{mod}.{x}" in MODULES:
                    aliases[x] = f"{mod}.{x}"
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, ast.alias) and node.asname and node.name in aliases:
                aliases[node.asname] = aliases[node.name]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{p}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, bad


def graph():
    g = {n: set() for n in MODULES}
    for n, p in MODULES.items():
        for mod, names, _ in imports(n, p):
            for t in project_target(mod, names):
                if t != n:
                    g[n].add(t)
    return g


def cycles(g):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    g = graph()
    # A package's __init__ re-exporting its modules is not a circle with them: leave out the
    # edges from a module to its own package's __init__ (``from . import x`` inside it).
    for n in g:
        g[n] = {t for t in g[n] if not n.startswith(t + ".")}
    assert not cycles(g), cycles(g)


def test_the_circle_check_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_only_the_mmseg_room_imports_mmseg():
    bad = [(n, mod) for n, p in MODULES.items() if not n.startswith("internvit_fast.mmseg")
           and n.startswith("internvit_fast") for mod, _, _ in imports(n, p) if mod.split(".")[0] in
           ("mmseg", "mmcv", "mmengine")]
    assert not bad, bad


def test_the_wheel_holds_no_developer_tool():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    packages = re.search(r"^packages = \[(.*?)\]", text, re.S | re.M).group(1)
    listed = set(re.findall(r'"([^"]+)"', packages))
    assert "tools" not in listed and not any(p.startswith(("tools", "benchmarks", "tests")) for p in listed)
    assert {m.rsplit(".", 1)[0] for m in MODULES if m.startswith("internvit_fast.")} <= listed | {"internvit_fast"}


@pytest.mark.parametrize("rule", ["private", "kernels"])
def test_the_rules_see_a_violation(rule, tmp_path, monkeypatch):
    """Each rule fails on a module that breaks it (written to a scratch room)."""
    pkg = tmp_path / "kernels"
    pkg.mkdir()
    (pkg / "bad.py").write_text("from internvit_fast.checkpoint.loader import _numel\n" if rule == "private"
                                else "from internvit_fast import model\n")
    name = "internvit_fast.kernels.bad"
    found = list(imports(name, str(pkg / "bad.py")))
    if rule == "private":
        assert any(x.startswith("_") for _, names, _ in found for x in names)
    else:
        assert any(m.startswith("internvit_fast") and not m.startswith("internvit_fast.kernels") for m, _, _ in found)
