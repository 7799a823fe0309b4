"""How an embedding model wants to be run: pooling, normalisation, length, prompt and EOS, read from the model itself.

Two sources, the model's own first:
- a sentence-transformers directory: `modules.json` (a Pooling module's folder, a Normalize module),
  `<pooling dir>/config.json` (`pooling_mode` or the older `pooling_mode_*` booleans; `include_prompt`),
  `sentence_bert_config.json` (`max_seq_length`; sentence-transformers >= 6 writes it as the tokenizer's
  `model_max_length` instead, with `padding_side`, in tokenizer_config.json) and `config_sentence_transformers.json`
  (`prompts` and `default_prompt_name`, the prompt sentence-transformers prepends when none is named);
- `DOCUMENTED`: the model cards' instructions for instruction-aware embedders that read more than their files say
  (e5-mistral: "Instruct: {task}\\nQuery: {text}", EOS appended, last token, normalised; Qwen3-Embedding:
  "Instruct: {task}\\nQuery:{text}", EOS appended, last token, normalised, left padding). They are matched by hub id
  (the spec, or the `models--org--name` folder of a hub cache path).
What neither says stays None ("unset"): extraction then uses the caller's value or the project default
(`features.resolve_options`). An explicit caller's value always wins.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Optional

from linalign_jax.errors import LinalignError

# sentence-transformers pooling modes -> ours ("last" is sentence-transformers' "lasttoken").
ST_POOLING = {"mean": "mean", "cls": "cls", "lasttoken": "last"}
ST_LEGACY_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                     "pooling_mode_lasttoken": "last", "pooling_mode_max_tokens": "max",
                     "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                     "pooling_mode_weightedmean_tokens": "weightedmean"}


@dataclasses.dataclass(frozen=True)
class EmbeddingConventions:
    """None = the model does not say. `prompt` is a template with "{text}" (and "{task}" when `default_task` is
    set); `append_eos` ensures each text's tokens end with the EOS id (appended unless the tokenizer already did)."""

    pooling: Optional[str] = None
    normalize: Optional[bool] = None
    max_length: Optional[int] = None
    prompt: Optional[str] = None
    default_task: Optional[str] = None
    append_eos: bool = False
    eos_token_id: Optional[int] = None  # the id `append_eos` appends (from tokenizer_config.json / config.json)
    padding_side: Optional[str] = None
    source: str = "none"              # where these came from, for logs and results

    def format(self, text: str, instruction: Optional[str] = None) -> str:
        """`text` in the model's prompt. instruction: None -> the documented default task; "" -> no prompt."""
        if instruction == "" or self.prompt is None:
            if instruction and self.prompt is None:
                raise LinalignError("this model documents no instruction format (no prompt in its metadata and "
                                    "no entry in models.conventions.DOCUMENTED); drop --instruction")
            return text
        if "{task}" not in self.prompt:
            if instruction:
                raise LinalignError(f"this model's prompt {self.prompt!r} takes no task; drop --instruction")
            return self.prompt.replace("{text}", text)
        return self.prompt.replace("{task}", instruction or self.default_task).replace("{text}", text)


# transformers writes model_max_length = int(1e30) when a tokenizer sets no limit.
UNBOUNDED_LENGTH = 10 ** 9
WEB_SEARCH_TASK = "Given a web search query, retrieve relevant passages that answer the query"
DOCUMENTED = {
    # https://huggingface.co/intfloat/e5-mistral-7b-instruct (model card: get_detailed_instruct, EOS appended)
    "intfloat/e5-mistral-7b-instruct": EmbeddingConventions(
        pooling="last", normalize=True, max_length=4096, prompt="Instruct: {task}\nQuery: {text}",
        default_task=WEB_SEARCH_TASK, append_eos=True, source="documented: intfloat/e5-mistral-7b-instruct"),
    **{f"Qwen/Qwen3-Embedding-{size}": EmbeddingConventions(
        # https://huggingface.co/Qwen/Qwen3-Embedding-8B (model card: no space after "Query:", <|endoftext|>)
        pooling="last", normalize=True, max_length=8192, prompt="Instruct: {task}\nQuery:{text}",
        default_task=WEB_SEARCH_TASK, append_eos=True, padding_side="left",
        source=f"documented: Qwen/Qwen3-Embedding-{size}") for size in ("0.6B", "4B", "8B")},
}


def hub_id_of(spec: str) -> Optional[str]:
    """The hub id a spec names: "org/name[@rev]" itself, or a hub cache path's models--org--name folder."""
    match = re.search(r"models--([^/\\]+?)--([^/\\]+)", str(spec))
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    if re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w.-]+)?", str(spec)):
        return str(spec).split("@")[0]
    return None


def read_sentence_transformers(model_dir: Path) -> EmbeddingConventions:
    """What a sentence-transformers directory says (all None when it is not one)."""
    model_dir = Path(model_dir)
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return EmbeddingConventions()
    modules = _json(modules_file)
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules}
    pooling = None
    if "Pooling" in kinds:
        pooling_config = _json(model_dir / kinds["Pooling"].get("path", "1_Pooling") / "config.json")
        pooling = _pooling_mode(pooling_config, model_dir)
        if pooling_config.get("include_prompt", True) is False and pooling != "last":
            raise LinalignError(f"{model_dir}: its Pooling excludes prompt tokens (include_prompt false), which "
                                "extraction does not do; pass --pooling and --instruction='' explicitly")
    bert_config = model_dir / "sentence_bert_config.json"
    tokenizer_config = model_dir / "tokenizer_config.json"
    tokenizer_config = _json(tokenizer_config) if tokenizer_config.is_file() else {}
    max_length = _json(bert_config).get("max_seq_length") if bert_config.is_file() else None
    if max_length is None and int(tokenizer_config.get("model_max_length") or 0) < UNBOUNDED_LENGTH:
        max_length = tokenizer_config.get("model_max_length")
    prompt = None
    st_config = model_dir / "config_sentence_transformers.json"
    if st_config.is_file():
        config = _json(st_config)
        name = config.get("default_prompt_name")
        if name:
            prompts = config.get("prompts") or {}
            if name not in prompts:
                raise LinalignError(f"{st_config}: default_prompt_name {name!r} is not among its prompts "
                                    f"{sorted(prompts)}")
            prompt = prompts[name] + "{text}"  # format() substitutes by str.replace: braces in it stay as they are
    return EmbeddingConventions(pooling=pooling, normalize=True if "Normalize" in kinds else None,
                                max_length=int(max_length) if max_length else None, prompt=prompt,
                                padding_side=tokenizer_config.get("padding_side"),
                                source=f"sentence-transformers: {model_dir}")


def conventions_for(spec: str, model_dir: Path, tokenizer=None) -> EmbeddingConventions:
    """The model's conventions: its sentence-transformers files, over the documented ones for its hub id."""
    documented = DOCUMENTED.get(hub_id_of(spec) or "", EmbeddingConventions())
    own = read_sentence_transformers(model_dir)
    if own.source == "none":
        merged = documented
    else:
        fields = {f.name: getattr(own, f.name) if getattr(own, f.name) is not None else getattr(documented, f.name)
                  for f in dataclasses.fields(EmbeddingConventions) if f.name not in ("append_eos", "source")}
        if documented.prompt is not None:  # the card's template (with its task slot) over a fixed ST default prompt
            fields["prompt"], fields["default_task"] = documented.prompt, documented.default_task
        source = own.source if documented.source == "none" else f"{own.source}; {documented.source}"
        merged = EmbeddingConventions(**fields, append_eos=documented.append_eos, source=source)
    if not merged.append_eos:
        return merged
    eos = eos_token_id(Path(model_dir), tokenizer)
    if eos is None:
        raise LinalignError(f"{spec}: its documented use appends an EOS token, but neither tokenizer_config.json "
                            "(eos_token) nor config.json (eos_token_id) names one")
    return dataclasses.replace(merged, eos_token_id=eos)


def eos_token_id(model_dir: Path, tokenizer=None) -> Optional[int]:
    """The EOS id: tokenizer_config.json's eos_token looked up in the tokenizer, else config.json's eos_token_id."""
    tokenizer_config = model_dir / "tokenizer_config.json"
    token = _json(tokenizer_config).get("eos_token") if tokenizer_config.is_file() else None
    token = token.get("content") if isinstance(token, dict) else token
    if token and tokenizer is not None and tokenizer.token_to_id(token) is not None:
        return int(tokenizer.token_to_id(token))
    config = _json(model_dir / "config.json") if (model_dir / "config.json").is_file() else {}
    ids = config.get("eos_token_id")
    ids = ids[0] if isinstance(ids, list) and ids else ids
    return int(ids) if isinstance(ids, int) else None


def _pooling_mode(config: dict, model_dir: Path) -> str:
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
        modes = [ST_POOLING.get(m, m) for m in modes]
    else:
        modes = [ours for key, ours in ST_LEGACY_POOLING.items() if config.get(key)] or ["mean"]
    if len(modes) != 1 or modes[0] not in ST_POOLING.values():
        raise LinalignError(f"{model_dir}: sentence-transformers pooling {modes} is not supported (supported: one of "
                            f"{sorted(ST_POOLING)}); pass --pooling explicitly")
    return modes[0]


def _json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LinalignError(f"cannot read sentence-transformers metadata {path}: {err}") from err
