"""cli.run's argv pre-pass: a repeatable flag on the command line replaces a flagfile's values instead of adding."""
from absl import flags

from linalign_jax.cli import flagfile_values_replaced


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
