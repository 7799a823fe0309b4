"""Every configs/*.flags parses with the binary its first line names: no unknown flag, no bad value, every required
flag given, no stray positional argument. Only the flag definitions run (one subprocess per binary: absl's flags are
process-global), never the job."""
import json
import shlex
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.flags"))

# Parses each config's arguments with the binary's FLAGS; prints one line per config that fails.
CHECK = """
import importlib, json, sys
from absl import flags
module, runs = sys.argv[1], json.loads(sys.argv[2])
importlib.import_module(module)
failed = False
for name, argv in runs:
    flags.FLAGS.unparse_flags()
    try:
        rest = flags.FLAGS([module] + argv)
        if len(rest) > 1:
            raise ValueError(f"positional arguments {rest[1:]}")
    except (flags.Error, ValueError) as e:
        print(f"{name}: {type(e).__name__}: {e}")
        failed = True
sys.exit(1 if failed else 0)
"""


def command_of(config: Path):
    """(module, argv) from the config's first line `# python -m experiments.X --flag...  (comment)`."""
    first = config.read_text().splitlines()[0]
    words = shlex.split(first.lstrip("#").split("(")[0])
    assert words[:2] == ["python", "-m"] and words[2].startswith("experiments."), (
        f"{config.name}: first line must be the command that runs it, got {first!r}")
    return words[2], words[3:]


def test_every_config_names_its_binary_and_itself():
    assert CONFIGS
    for config in CONFIGS:
        _, argv = command_of(config)
        assert f"--flagfile=configs/{config.name}" in argv, f"{config.name}: the command does not read this file"


def test_every_config_parses_with_its_binary(tmp_path):
    """Also parses a planted config with an unknown flag, which must be the one failure reported."""
    runs = defaultdict(list)
    for config in CONFIGS:
        module, argv = command_of(config)
        runs[module].append((config.name, argv))
    planted = tmp_path / "planted.flags"
    planted.write_text("--source_model=a\n--target_model=b\n--task_data=c\n--out_dir=d\n--no_such_flag=1\n")
    runs["experiments.align"].append(("planted.flags", [f"--flagfile={planted}"]))
    procs = {module: subprocess.Popen([sys.executable, "-c", CHECK, module, json.dumps(batch)], cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for module, batch in runs.items()}
    reports = {}
    for module, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        reports[module] = (proc.returncode, out or err[-2000:])
    align_code, align_out = reports.pop("experiments.align")
    assert align_code == 1 and align_out.startswith("planted.flags:") and "no_such_flag" in align_out, align_out
    assert align_out.count("\n") == 1, f"configs for experiments.align fail:\n{align_out}"
    failures = [f"{module}:\n{out}" for module, (code, out) in reports.items() if code]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("line", ["# run me with care", "# python experiments/align.py"])
def test_a_first_line_that_is_not_a_command_is_rejected(tmp_path, line):
    config = tmp_path / "x.flags"
    config.write_text(line + "\n--out_dir=d\n")
    with pytest.raises(AssertionError, match="first line"):
        command_of(config)
