"""Data flows one way: every `linalign_jax` import (module level or inside a function) goes from a higher layer to a
lower one, never sideways between two units of one layer, and the library never imports `experiments`. Checked on the
source (AST), so a lazy import inside a function counts too."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "linalign_jax"

# Lowest first. A unit is a top-level module or subpackage of linalign_jax.
LAYERS = (
    ("errors",),
    ("io_utils", "shapes", "distributed"),
    ("assets",),
    ("data",),
    ("models", "tokenizer_compat", "precomputed"),
    ("features",),
    ("feature_shards", "embedders", "align", "similarity"),
    ("evaluate", "generate", "helix"),
    ("serve", "reports"),
    ("cli",),
)
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path):
    """(imported linalign_jax module, line) for every import in a source file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "linalign_jax":
                for alias in node.names:
                    yield f"linalign_jax.{alias.name}", node.lineno
            else:
                yield node.module, node.lineno


def edges():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        source = unit_of(".".join(relative.parts))
        for module, line in imports(path):
            if module.split(".")[0] in ("linalign_jax", "experiments", "tests"):
                yield path, line, source, module


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert units - {"__main__"} == set(LAYER_OF), "add new modules/packages to LAYERS (and the README picture)"


def test_imports_only_go_down():
    wrong = []
    for path, line, source, module in edges():
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        if not module.startswith("linalign_jax"):
            wrong.append(f"{where} (the library never imports binaries or tests)")
            continue
        target = unit_of(module)
        if target == source or source == "__init__":
            continue
        if target == "__init__":
            wrong.append(f"{where} (import the unit itself, not the package root)")
        elif LAYER_OF[target] >= LAYER_OF[source]:
            kind = "sideways" if LAYER_OF[target] == LAYER_OF[source] else "upward"
            wrong.append(f"{where} ({kind}: {source} is in layer {LAYER_OF[source]}, {target} in {LAYER_OF[target]})")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_upward_imports(tmp_path):
    """The AST walk finds function-level imports and `from linalign_jax import x` forms."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from linalign_jax import features\n    import linalign_jax.align.ridge\n")
    assert [m for m, _ in imports(source)] == ["linalign_jax.features", "linalign_jax.align.ridge"]
    assert LAYER_OF[unit_of("linalign_jax.align.ridge")] > LAYER_OF[unit_of("linalign_jax.distributed.mesh")]
