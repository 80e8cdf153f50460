"""The package's shape, read from its source: no import cycle, no test scaffolding, the layering rules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")  # fmt: skip


def imported(name: str, path: Path, known: set[str], module_level: bool) -> set[str]:
    """The package modules ``name`` imports: at module level only (what runs at import time, ``TYPE_CHECKING``
    blocks excluded), or anywhere in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    if module_level:
        nodes, stack = [], list(tree.body)
        while stack:  # statements that run at import: descend into if/try/with, not into defs or classes
            node = stack.pop()
            if isinstance(node, ast.If) and _is_type_checking(node):
                stack.extend(node.orelse)
            elif isinstance(node, ast.If | ast.Try | ast.With):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    stack.extend(getattr(node, field, []))
            elif isinstance(node, ast.ExceptHandler):
                stack.extend(node.body)
            else:
                nodes.append(node)
    else:
        nodes = list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import pipeline.a.b` also runs pipeline.a's __init__; keep the deepest known
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph(module_level: bool = True) -> dict[str, set[str]]:
    mods = modules()
    return {n: imported(n, p, set(mods), module_level) for n, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
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
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle_and_resolves_relative_imports(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    src = tmp_path / "pkg" / "sub" / "m.py"
    src.parent.mkdir(parents=True)
    src.write_text("from . import n\nfrom ..top import x\nif TYPE_CHECKING:\n    import pkg.hidden\n"
                   "def f():\n    import pkg.late\n")  # fmt: skip
    known = {"pkg", "pkg.sub", "pkg.sub.m", "pkg.sub.n", "pkg.top", "pkg.hidden", "pkg.late"}
    assert imported("pkg.sub.m", src, known, module_level=True) == {"pkg.sub", "pkg.sub.n", "pkg.top"}
    assert "pkg.late" in imported("pkg.sub.m", src, known, module_level=False)


def test_no_import_cycle_inside_the_package():
    g = graph(module_level=True)
    assert len(g) > 30 and g["pipeline.train.trainer"]  # the walk saw the package
    assert cycles(g) == []


def test_extraction_and_training_never_import_each_other():
    g = graph(module_level=False)
    for a, b in (("pipeline.extract", "pipeline.train"), ("pipeline.train", "pipeline.extract")):
        crossing = {m: sorted(d for d in deps if d.startswith(b)) for m, deps in g.items() if m.startswith(a)}
        assert not {m: d for m, d in crossing.items() if d}, crossing


def test_no_test_scaffolding_inside_the_package():
    """Helpers for tests live under tests/: no module of the package is named after them, none imports pytest."""
    mods = modules()
    assert not [m for m in mods if m.rpartition(".")[2] in ("synthetic", "vllm_replay", "conftest")]
    for name, path in mods.items():
        assert not {"pytest", "unittest"} & {n.split(".")[0] for n in _all_imports(path)}, name


def _all_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.add(node.module or "")
    return out


def _option_defaults(command) -> dict[str, object]:
    import click

    ctx = click.Context(command)
    return {p.name: p.get_default(ctx) for p in command.params if p.name}


def test_cli_defaults_are_the_configs_defaults():
    """Every option of train/extract/eval that sets a config field defaults to that field's default (one source)."""
    import inspect

    from pipeline.cli import extract, train
    from pipeline.evaluate.cli import eval_command, evaluate
    from pipeline.evaluate.drafter import DraftSettings
    from pipeline.extract.runner import ExtractConfig
    from pipeline.options import defaults, short_dtype
    from pipeline.train.trainer import TrainConfig

    renamed = {"deepspeed_json": "deepspeed"}
    inverted = {"no_packing": "packing", "no_progress": "progress"}
    unset = {"fim_tokens"}  # a "p,s,m" string on the command line; unset means the config's default
    for command, config, spell in ((train, TrainConfig, lambda v: v), (extract, ExtractConfig, short_dtype)):
        want = defaults(config)
        checked = 0
        for name, default in _option_defaults(command).items():
            if name in unset:
                assert default is None, name
            elif name in inverted:
                assert default is False and want[inverted[name]] is True, name
            elif renamed.get(name, name) in want:
                field = want[renamed.get(name, name)]
                assert default == (spell(field) if isinstance(field, str) else field), (command.name, name)
            else:
                continue
            checked += 1
        assert checked >= 20, (command.name, checked)
    evaluated = {k: p.default for k, p in inspect.signature(evaluate).parameters.items()}
    options = _option_defaults(eval_command)
    shared = [k for k in options if k in evaluated and evaluated[k] is not inspect.Parameter.empty]
    assert len(shared) >= 10
    same = [k for k in shared if k != "baselines"]  # a comma-separated string vs a tuple (None: all)
    assert {k: options[k] for k in same} == {k: evaluated[k] for k in same}
    assert {k: options[k] for k in defaults(DraftSettings)} == defaults(DraftSettings)
