"""What every binary in `experiments/` shares: the absl flag groups (one set of defaults), and the entry point.

A binary defines its flags from these groups plus its own, then hands `main` to `cli.run`:

    cli.define_model_flags("source_model", "target_model")
    cli.define_data_flags("task_data", "public_data")
    cli.define_extraction_flags()
    ...
    def main(argv):   # cli.run has already refused stray positional arguments
        run(cli.command_line())
    if __name__ == "__main__":
        cli.run(main)

The extraction defaults are `features.ExtractOptions()`; they are feature-cache key inputs, so two binaries run on the
same models and texts share cache entries. A flag is defined once per process (a second call of a group skips what
exists, and the first definition's default stands), so a binary built from library pieces never defines a flag
twice. Groups: models, data, extraction, ridge λ, generation, HELIX connection (client / provider), distributed.
"""
from __future__ import annotations

import logging
import shlex
import sys
from typing import Callable, Mapping, Sequence

from absl import app, flags

from linalign_jax.distributed import MODES, initialize
from linalign_jax.errors import LinalignError, exit_on_bad_input
from linalign_jax.features import PROJECT_DEFAULTS, ExtractOptions
from linalign_jax.io_utils import configure_logging

FLAGS = flags.FLAGS
DTYPES = ("float32", "bfloat16")

MODEL_ROLES = {
    "model": "model spec: asset name, hub id, HF directory, .gguf file or embeddings .parquet",
    "source_model": "party B's model spec (the map's input side): asset name, hub id, HF directory, .gguf file or "
                    "embeddings .parquet",
    "target_model": "party A's model spec (the map's output side; owns the head): asset name, hub id, HF "
                    "directory, .gguf file or embeddings .parquet",
}
# dataset spec flag -> (help, its limit flags as (name, default, help))
DATA_SPECS = {
    "data": ("dataset or text spec: registry name, local file / directory or hub id",
             (("limit", 0, "texts taken from --data (0 = all)"),)),
    "task_data": ("labelled task dataset spec (train / test splits)",
                  (("train_limit", 0, "stratified subsample of the task train split (0 = all)"),
                   ("test_limit", 0, "stratified subsample of the task test split (0 = all)"))),
    "ood_data": ("dataset spec whose test texts are the OOD set ('' = no OOD evaluation)",
                 (("ood_limit", 1000, "texts taken from the OOD dataset's test split (0 = all)"),)),
    "public_data": ("unlabelled corpus spec for fitting maps (public, a .txt file, a table or a dataset)",
                    (("public_limit", 5000, "texts taken from the public corpus"),)),
}
DATA_DEFAULTS = {"ood_data": "", "public_data": "public"}


def _defined(name: str) -> bool:
    return name in FLAGS


def define_model_flags(*roles: str, list_flag: str | None = None, defaults: Mapping[str, str] | None = None) -> None:
    """A model-spec flag per role (see MODEL_ROLES), optionally a comma-separated list flag, and --dtype.
    `defaults`: role -> spec, for a demo or benchmark that runs on its own models when none are given."""
    for role in roles:
        if role not in MODEL_ROLES:
            raise ValueError(f"unknown model role {role!r}; expected one of {sorted(MODEL_ROLES)}")
    defaults = _checked(defaults, roles, "model role")
    for role in roles:
        if not _defined(role):
            flags.DEFINE_string(role, defaults.get(role), MODEL_ROLES[role])
    if list_flag and not _defined(list_flag):
        flags.DEFINE_list(list_flag, None, "model specs, comma-separated (asset names, hub ids, paths)")
    if not _defined("dtype"):
        flags.DEFINE_enum("dtype", "float32", list(DTYPES), "model parameter / compute dtype")


def define_data_flags(*specs: str, defaults: Mapping[str, object] | None = None, omit: Sequence[str] = ()) -> None:
    """A dataset-spec flag per name in DATA_SPECS with its limit flags, --data_seed, and the column names of local /
    hub tables (--text_column, --label_column). `defaults`: a spec's or limit's own value for a binary with a reason
    for it (HELIX: --public_limit 4096, one fit ciphertext's block); `omit`: limit or column flags the binary has no
    use for (the HELIX client classifies the test split only: no --train_limit; unlabelled texts: no --label_column)."""
    for spec in specs:
        if spec not in DATA_SPECS:
            raise ValueError(f"unknown dataset flag {spec!r}; expected one of {sorted(DATA_SPECS)}")
    names = [n for spec in specs for n in (spec, *(lim[0] for lim in DATA_SPECS[spec][1]))]
    defaults = _checked(defaults, names, "dataset flag")
    _checked(dict.fromkeys(omit), [n for n in names if n not in specs] + ["label_column"], "limit or column flag")
    for spec in specs:  # flag by flag: a binary that omits one does not take it from the next binary in a process
        help_text, limits = DATA_SPECS[spec]
        if not _defined(spec):
            flags.DEFINE_string(spec, defaults.get(spec, DATA_DEFAULTS.get(spec)), help_text)
        for name, default, limit_help in limits:
            if name not in omit and not _defined(name):
                flags.DEFINE_integer(name, defaults.get(name, default), limit_help)
    if not _defined("data_seed"):
        flags.DEFINE_integer("data_seed", 0, "seed of the dataset split and of every subsample")
        flags.DEFINE_string("text_column", "text", "text column of a local / hub dataset")
    if "label_column" not in omit and not _defined("label_column"):
        flags.DEFINE_string("label_column", "label", "label column of a local / hub dataset")


def _checked(defaults, names, what: str) -> dict:
    """`defaults` as a dict whose keys are all among `names` (a typo would silently keep the shared default)."""
    defaults = dict(defaults or {})
    unknown = sorted(set(defaults) - set(names))
    if unknown:
        raise ValueError(f"defaults for {unknown}: not a {what} this call defines ({sorted(names)})")
    return defaults


def define_extraction_flags(pooled: bool = True, every_layer: bool = False, model_conventions: bool = True) -> None:
    """--max_length, --batch_size and, for pooled (cacheable) features, --pooling, --layer, --normalize,
    --instruction and --feature_cache. Pooled binaries leave --pooling / --normalize / --max_length unset by default:
    the model's own metadata decides (features.ExtractOptions.cache_kwargs), then features.PROJECT_DEFAULTS.
    model_conventions=False sets them to PROJECT_DEFAULTS up front (HELIX: the two parties compare these values
    before either loads a model). Token-level binaries (pooled=False: the generation maps) get --max_length =
    PROJECT_DEFAULTS'. A binary that pools every hidden state (every_layer=True: the layer sweep) has no --layer."""
    if _defined("max_length"):
        return
    d = ExtractOptions()
    stated = not (pooled and model_conventions)
    unset = "" if stated else " (default: the model's own metadata, else {})"

    def default(name):
        return PROJECT_DEFAULTS[name] if stated else getattr(d, name)

    flags.DEFINE_integer("max_length", default("max_length"), "tokens per text; longer texts are truncated and "
                         "counted" + unset.format(PROJECT_DEFAULTS["max_length"]))
    flags.DEFINE_integer("batch_size", d.batch_size, "texts per forward pass (per process)")
    if pooled:
        flags.DEFINE_string("feature_cache", d.cache_dir, "feature cache directory (default $LINALIGN_CACHE/features)")
        flags.DEFINE_enum("pooling", default("pooling"), ["mean", "last", "cls"], "how token states become one "
                          "vector per text" + unset.format(PROJECT_DEFAULTS["pooling"]))
        if not every_layer:
            flags.DEFINE_integer("layer", d.layer, "-1: final hidden state (after the final norm); i: hidden_states[i]")
        flags.DEFINE_bool("normalize", default("normalize"), "L2-normalise each pooled vector (sentence-transformers' "
                          "output)" + unset.format(PROJECT_DEFAULTS["normalize"]))
        flags.DEFINE_string("instruction", d.instruction, "task of an instruction-aware embedder (e5-mistral, "
                            "Qwen3-Embedding: 'Instruct: <task>' prompts); default: its documented default task; "
                            "'' = embed the bare texts")


def extraction_options() -> ExtractOptions:
    """The extraction flags as options (the pooled-only ones at their defaults when not defined)."""
    d = ExtractOptions()

    def value(name, default):
        return FLAGS[name].value if _defined(name) else default

    return ExtractOptions(pooling=value("pooling", d.pooling), layer=value("layer", d.layer),
                          max_length=FLAGS.max_length, normalize=value("normalize", d.normalize),
                          batch_size=FLAGS.batch_size, cache_dir=value("feature_cache", d.cache_dir),
                          instruction=value("instruction", d.instruction))


def define_generation_flags() -> None:
    """The token-level map of cross-model generation and how it is scored (paper §3.2; defaults: the paper's):
    --fit_data / --fit_texts, --heldout_texts / --heldout_tokens and --max_new_tokens (λ: define_ridge_flag)."""
    if _defined("fit_texts"):
        return
    flags.DEFINE_string("fit_data", "public", "fitting texts: a load_texts spec (public, .txt, table, hub id), an "
                        "Alpaca file or an MMLU-format file (generate.protocol.fitting_texts)")
    flags.DEFINE_integer("fit_texts", 4000, "texts the token-level map is fitted on (the paper: 4,000)")
    flags.DEFINE_integer("heldout_texts", 100, "held-out texts for tokenizer compatibility and next-token scores")
    flags.DEFINE_integer("heldout_tokens", 64, "target tokens scored per held-out text (at most)")
    flags.DEFINE_integer("max_new_tokens", 128, "tokens generated per prompt (the paper: 128)")


def define_ridge_flag(default: str = "auto", allow_cv: bool = False) -> None:
    """--ridge_lambda of the binary's ridge maps: a float > 0 or 'auto' (GCV), and 'cv' (k-fold CV) where the binary
    fits from labelled rows (allow_cv; parse with `align.ridge.parse_lambda(..., allow_cv=True)`). Maps for
    classification default to 'auto'; generation's token maps to the paper's 1e-4."""
    if not _defined("ridge_lambda"):
        flags.DEFINE_string("ridge_lambda", default, "ridge λ: a float > 0, 'auto' (GCV)"
                            + (" or 'cv' (k-fold CV)" if allow_cv else ""))


def define_helix_flags() -> None:
    """How a HELIX client reaches its provider: --provider (host:port) or --provider_file (the provider's port file),
    the bearer token, TLS (--tls_ca, --tls_server_name), --allow_plaintext off loopback, the preset floor and the
    per-call deadline --timeout_s."""
    if _defined("provider"):
        return
    flags.DEFINE_string("provider", "127.0.0.1:50051", "provider host:port")
    flags.DEFINE_string("provider_file", "", "read host/port from the provider's --port_file instead")
    _define_helix_common()
    flags.DEFINE_string("tls_ca", "", "PEM CA (or the provider's self-signed certificate): enables TLS")
    flags.DEFINE_string("tls_server_name", "", "expected name in the provider's certificate, if not the host")
    flags.DEFINE_float("timeout_s", 60.0, "deadline of each query (a fit gets --fit_timeout_s)")


def define_helix_provider_flags() -> None:
    """The provider's side of `define_helix_flags`: where it listens (--host, --port, --port_file for clients'
    --provider_file), the token clients must present, TLS (--tls_cert + --tls_key), --allow_plaintext off loopback
    and the preset floor."""
    if _defined("port"):
        return
    flags.DEFINE_string("host", "127.0.0.1", "address to bind (0.0.0.0 for every interface; needs TLS or "
                        "--allow_plaintext)")
    flags.DEFINE_integer("port", 50051, "port to bind (0 = any free port, see --port_file)")
    flags.DEFINE_string("port_file", "", "write {host, port, pid} here (atomically) once serving")
    _define_helix_common()
    flags.DEFINE_string("tls_cert", "", "PEM certificate chain; with --tls_key enables TLS")
    flags.DEFINE_string("tls_key", "", "PEM private key for --tls_cert")


def _define_helix_common() -> None:
    """The flags both parties share, with the same meaning on either side."""
    if _defined("token_file"):
        return
    flags.DEFINE_string("token", "", "the bearer token (prefer --token_file)")
    flags.DEFINE_string("token_file", "", "file holding the bearer token")
    flags.DEFINE_bool("allow_plaintext", False, "plaintext transport to / on a non-loopback address (trusted "
                      "networks only; otherwise TLS)")
    flags.DEFINE_bool("allow_insecure_preset_for_tests", False, "accept a CKKS preset below 128-bit security "
                      "(tests only)")


def helix_token() -> str:
    """The bearer token from --token / --token_file (a LinalignError when neither or both are usable)."""
    from linalign_jax.serve.auth import load_token

    return load_token(FLAGS.token, FLAGS.token_file)


def define_distributed_flags() -> None:
    """JAX's multi-process runtime (read by `initialize_distributed`) and the mesh's model axis."""
    if _defined("distributed"):
        return
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0's JAX coordinator (or env JAX_COORDINATOR_ADDRESS)")
    flags.DEFINE_integer("num_processes", None, "number of processes in the job (or env JAX_NUM_PROCESSES)")
    flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes) (or env JAX_PROCESS_ID)")
    flags.DEFINE_enum("distributed", "auto", list(MODES),
                      "auto: multi-process when the three flags/env vars are set or SLURM/Open MPI/TPU env shows "
                      ">1 task; on: always call jax.distributed.initialize() (its own cluster detection: TPU pods, "
                      "SLURM, k8s); off: single process")
    flags.DEFINE_integer("model_axis_size", 1, "devices per process that split each model's weights (FSDP); the "
                         "rest split the batch")


def initialize_distributed() -> bool:
    """Start JAX's distributed runtime from the distributed flags; first thing in `main`, before any device use."""
    return initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, mode=FLAGS.distributed)


def int_list(name: str) -> list:
    """A comma-separated list flag as ints, or a LinalignError naming the flag."""
    try:
        return [int(v) for v in FLAGS[name].value]
    except ValueError:
        raise LinalignError(f"--{name} takes comma-separated integers, got {','.join(FLAGS[name].value)!r}") from None


def command_line() -> str:
    """The command that reproduces this run (`python -m experiments.X --flag...`), for the results it writes."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([program, *(shlex.quote(a) for a in sys.argv[1:])])


def run(main: Callable[[Sequence[str]], None]) -> None:
    """absl's app.run with the house conventions: stray positional arguments are a usage error (no binary takes
    any), library logs go to stderr at INFO (one format), JAX's backend probing stays quiet, and a LinalignError (bad
    input) becomes one `error: ...` line and exit status 2. Every other exception is a bug and keeps its traceback."""

    def wrapped(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        _configure_logging()
        with exit_on_bad_input():
            main(argv)

    try:
        argv = flagfile_values_replaced(sys.argv, FLAGS)
    except (OSError, flags.Error):  # an unreadable flagfile: absl's own parse reports it
        argv = sys.argv
    app.run(wrapped, argv=argv)


def flagfile_values_replaced(argv: Sequence[str], flag_values=FLAGS) -> list:
    """`argv` with every --flagfile expanded in place, minus a flagfile's values of each repeatable flag that the
    command line gives too. absl appends repeated values of a multi flag (`--prompt` after a flagfile's prompts
    would add to them); with this, a flag on the command line replaces the flagfile's value for every flag alike."""

    def name(arg: str):
        return arg.lstrip("-").split("=", 1)[0] if arg.startswith("-") and arg not in ("-", "--") else None

    args, joined = list(argv[1:]), []
    while args:  # "--flagfile F" -> "--flagfile=F"
        arg = args.pop(0)
        joined.append(f"--flagfile={args.pop(0)}" if name(arg) == "flagfile" and "=" not in arg and args else arg)
    direct = {name(a) for a in joined if name(a) and name(a) != "flagfile"}
    repeated = {n for n in direct if n in flag_values and isinstance(flag_values[n], flags.MultiFlag)}
    out = [argv[0]]
    for arg in joined:
        if name(arg) == "flagfile":
            expanded = flag_values.read_flags_from_files([argv[0], arg], force_gnu=True)[1:]
            out += [a for a in expanded if name(a) not in repeated]
        else:
            out.append(arg)
    return out


def _configure_logging() -> None:
    configure_logging()
    # jax probes every backend it was built for (on a machine without TPUs that is noise, not news), and datasets
    # announces the JAX it found: both at INFO.
    for noisy in ("jax._src.xla_bridge", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def embed_with_flags(texts: Sequence[str], missing_model: str):
    """Features of `texts` under the binary's --model, --dtype and extraction flags (`embedders.embed_texts`);
    `missing_model` says why --model is needed."""
    from linalign_jax.embedders import embed_texts

    if not FLAGS.model:
        raise LinalignError(f"--model is required {missing_model}")
    return embed_texts(FLAGS.model, texts, extraction_options(), FLAGS.dtype)
