"""cli: the argv pre-pass (a repeatable flag on the command line replaces a flagfile's values instead of adding),
the shared flag groups (no binary defines its own copy) and the command a run records."""
import ast
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from absl import flags

from linalign_jax import cli
from linalign_jax.cli import flagfile_values_replaced

REPO = Path(__file__).resolve().parents[1]


def test_command_line_replaces_a_flagfiles_repeatable_values(tmp_path):
    fv = flags.FlagValues()
    flags.DEFINE_multi_string("prompt", ["default"], "", flag_values=fv)
    flags.DEFINE_multi_string("stop", [], "", flag_values=fv)
    flags.DEFINE_string("out_dir", None, "", flag_values=fv)
    config = tmp_path / "gen.flags"
    config.write_text("--prompt=from the file\n--prompt=another\n--stop=END\n--out_dir=runs/a\n")
    argv = flagfile_values_replaced(["prog", "--flagfile", str(config), "--prompt=mine", "--prompt", "second",
                                     "--out_dir=runs/b"], fv)
    fv(argv)
    assert fv.prompt == ["mine", "second"]   # replaced, not ["from the file", "another", "mine", "second"]
    assert fv.stop == ["END"] and fv.out_dir == "runs/b"  # untouched / the usual last-wins rule
    fv.unparse_flags()
    fv(flagfile_values_replaced(["prog", f"--flagfile={config}"], fv))
    assert fv.prompt == ["from the file", "another"]


# Every shared group, defined in a fresh process (absl's flags are process-global): the names the groups own.
GROUP_NAMES = """
import json
from absl import flags
from linalign_jax import cli
cli.define_model_flags(*cli.MODEL_ROLES, list_flag="models")
cli.define_data_flags(*cli.DATA_SPECS)
cli.define_extraction_flags()
cli.define_helix_flags()
cli.define_helix_provider_flags()
cli.define_distributed_flags()
cli.define_generation_flags()
cli.define_ridge_flag()
print(json.dumps(sorted(f.name for f in flags.FLAGS.flags_by_module_dict()[cli.__name__])))
"""


def own_definitions(source: str) -> list:
    """(line, flag name) of every `flags.DEFINE_*("name", ...)` call in a module's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr.startswith("DEFINE") and node.args and isinstance(node.args[0], ast.Constant):
            found.append((node.lineno, node.args[0].value))
    return found


def test_no_binary_redefines_a_shared_flag():
    """A flag the cli groups own (--max_length, --task_data, --token_file, ...) is defined only there: a binary
    that defines its own copy brings back a second default (and a second feature-cache key)."""
    done = subprocess.run([sys.executable, "-c", GROUP_NAMES], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    shared = set(json.loads(done.stdout))
    assert {"max_length", "pooling", "task_data", "public_limit", "data_seed", "dtype", "token_file", "tls_ca",
            "port_file", "tls_key", "timeout_s", "fit_texts", "ridge_lambda"} <= shared
    planted = 'from absl import flags\nflags.DEFINE_integer("max_length", 64, "tokens per text")\n'
    assert [name for _, name in own_definitions(planted) if name in shared] == ["max_length"]
    copies = [f"{path.name}:{line} --{name}" for path in sorted((REPO / "experiments").glob("*.py"))
              for line, name in own_definitions(path.read_text()) if name in shared]
    assert not copies, f"binaries define flags of the shared cli groups (use linalign_jax.cli): {copies}"


def test_group_defaults_name_only_flags_the_call_defines():
    with pytest.raises(ValueError, match="modle"):
        cli.define_model_flags("model", defaults={"modle": "x"})
    with pytest.raises(ValueError, match="public_limt"):
        cli.define_data_flags("public_data", defaults={"public_limt": 1})
    with pytest.raises(ValueError, match="public_data"):  # a spec flag is not a limit to omit
        cli.define_data_flags("public_data", omit=("public_data",))


def test_command_line_reproduces_a_module_run(monkeypatch):
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="experiments.align")
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["/x/experiments/align.py", "--flagfile=configs/demo.flags", "--out_dir=a b"])
    assert cli.command_line() == "python -m experiments.align --flagfile=configs/demo.flags '--out_dir=a b'"
