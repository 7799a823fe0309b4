"""The paper's generation protocol (§3.2): prompts formatted with each model's own chat template, greedy decoding of
up to 128 tokens, multiple-choice questions stopped at the first valid answer letter (Fig. 3: accuracy vs the
native target), Alpaca-format instructions, and outputs as JSONL records for a later judge.

* Chat templates are read from where the model keeps them: `chat_template.jinja` or `tokenizer_config.json`
  (`chat_template`, a string or a list of named ones: "default" is used) in an HF directory, the GGUF metadata key
  `tokenizer.chat_template` for a .gguf model. They are rendered with jinja2 exactly as transformers does
  (sandboxed, trim_blocks + lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`). A model without a template
  (a base model such as gemma-3-270m) gets the plain text (Alpaca records: the Alpaca prompt). A rendered template
  already holds the BOS text, so it is encoded without adding special tokens (as `apply_chat_template` does).
* Multiple choice (MMLU format: `question`, `choices` (a list), `answer` (index or letter)): the prompt lists the
  choices as "A. ...", ends with "Answer:", and decoding stops as soon as a standalone valid letter appears
  (`answer_stop`); no letter within the token budget counts as wrong.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from linalign_jax.errors import LinalignError

PAPER_MAX_NEW_TOKENS = 128
LETTERS = "ABCDEFGHIJ"
ALPACA_PROMPT = ("Below is an instruction that describes a task{context}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


# ------------------------------------------------------------------------------------------------- chat templates

def read_chat_template(model_dir: Path) -> Optional[str]:
    """The chat template stored with a model directory (or its GGUF source), None when it has none."""
    model_dir = Path(model_dir)
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        if template:
            return template
    source = model_dir / "gguf_source.json"
    if source.is_file():
        return gguf_string(json.loads(source.read_text())["gguf"], "tokenizer.chat_template")
    return None


_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_string(path, key: str) -> Optional[str]:
    """The string value of one GGUF metadata key, reading only the key/value header (`gguf.GGUFReader` maps every
    tensor first: 11 s for SmolLM2's 98 MB file on a loaded machine). None when the key is absent."""
    import struct

    with open(path, "rb") as f:
        magic, _version, _tensors, count = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF":
            raise LinalignError(f"{path}: not a GGUF file")

        def read_string():
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8")

        def skip(kind):
            if kind == _GGUF_STRING:
                f.seek(struct.unpack("<Q", f.read(8))[0], 1)
            elif kind == _GGUF_ARRAY:
                item, n = struct.unpack("<IQ", f.read(12))
                if item in _GGUF_SCALAR_SIZES:
                    f.seek(n * _GGUF_SCALAR_SIZES[item], 1)
                else:
                    for _ in range(n):
                        skip(item)
            else:
                f.seek(_GGUF_SCALAR_SIZES[kind], 1)

        for _ in range(count):
            name = read_string()
            (kind,) = struct.unpack("<I", f.read(4))
            if name == key and kind == _GGUF_STRING:
                return read_string()
            skip(kind)
    return None


def _raise(message):
    raise LinalignError(f"chat template: {message}")


def render_chat(template: str, messages: Sequence[Dict[str, str]], *, add_generation_prompt: bool = True,
                **special_tokens) -> str:
    """`template` rendered over `messages` like transformers' `apply_chat_template(..., tokenize=False)`."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # a dependency in setup.py; say what to install rather than fail obscurely
        raise LinalignError("chat templates need jinja2 (pip install 'jinja2>=3.1')") from e
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                            **special_tokens)


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How one model is prompted: its chat template (None: plain text) and the special-token strings it reads."""

    template: Optional[str]
    special_tokens: Dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def add_special_tokens(self) -> bool:
        """Encode with the tokenizer's own BOS/EOS only for plain text (a rendered template already has them)."""
        return self.template is None

    def user(self, text: str) -> str:
        if self.template is None:
            return text
        return render_chat(self.template, [{"role": "user", "content": text}], **self.special_tokens)


def prompt_format(tokenizer, model_dir: Optional[Path]) -> PromptFormat:
    """The PromptFormat of the model in `model_dir` (`model_directory(spec)`; None: plain text) with `tokenizer`."""
    template = read_chat_template(model_dir) if model_dir is not None else None
    config_path = Path(model_dir) / "config.json" if model_dir is not None else None
    config = json.loads(config_path.read_text()) if config_path is not None and config_path.is_file() else {}
    inverse = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    special = {}
    for name in ("bos", "eos"):
        token_id = config.get(f"{name}_token_id")
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if token_id is not None and token_id in inverse:
            special[f"{name}_token"] = inverse[token_id]
    return PromptFormat(template=template, special_tokens=special)


def model_directory(spec: str) -> Optional[Path]:
    """The HF directory a model spec loads from (a GGUF file's materialised copy), None if it is not local."""
    from linalign_jax.assets import resolve_model
    from linalign_jax.models import gguf

    path = Path(str(spec)).expanduser()
    if not path.exists():
        try:
            path = Path(resolve_model(str(spec)))
        except LinalignError:
            return None
    return gguf.materialize(path) if gguf.is_gguf(path) else path


# ------------------------------------------------------------------------------------------------ multiple choice

@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    question: str
    choices: tuple
    answer: int          # index into choices

    @property
    def letters(self) -> str:
        return LETTERS[:len(self.choices)]

    def prompt(self) -> str:
        lines = [self.question.strip()] + [f"{l}. {c}" for l, c in zip(self.letters, self.choices)]
        return "\n".join(lines) + "\nAnswer:"


def load_multiple_choice(path, limit: int = 0) -> List[MultipleChoice]:
    """MMLU-format records (`question`, `choices`, `answer` = index or letter) from a CSV/TSV/JSON/JSONL/parquet
    file; CSV `choices` are a JSON list."""
    from linalign_jax.data.local import read_table

    path = Path(path)
    table = read_table(path, ["question", "choices", "answer"])
    items = []
    for row, (q, choices, answer) in enumerate(zip(table["question"], table["choices"], table["answer"])):
        where = f"{path} row {row}"
        if isinstance(choices, str):
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError as e:
                raise LinalignError(f"{where}: choices must be a list (a JSON list in CSV), got {choices!r}") from e
        if not isinstance(choices, (list, tuple)) or not 2 <= len(choices) <= len(LETTERS):
            raise LinalignError(f"{where}: choices must be a list of 2-{len(LETTERS)} options, got {choices!r}")
        if isinstance(answer, str) and answer.strip().upper() in LETTERS[:len(choices)] and not answer.isdigit():
            answer = LETTERS.index(answer.strip().upper())
        try:
            answer = int(answer)
        except (TypeError, ValueError):
            answer = -1
        if not 0 <= answer < len(choices) or not isinstance(q, str) or not q.strip():
            raise LinalignError(f"{where}: needs a non-empty question and an answer index in [0, {len(choices)}) "
                                f"or a letter, got question={q!r}, answer={answer!r}")
        items.append(MultipleChoice(q, tuple(str(c) for c in choices), answer))
        if limit and len(items) == limit:
            break
    if not items:
        raise LinalignError(f"{path}: no multiple-choice records")
    return items


def _letter_pattern(letters: str):
    return re.compile(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])")


def answer_stop(letters: str = "ABCD") -> Callable[[str], int]:
    """A `stop_at` for decoding: the end of the first standalone valid letter in the continuation, or -1."""
    pattern = _letter_pattern(letters)

    def stop_at(text: str) -> int:
        m = pattern.search(text)
        return m.end() if m else -1

    return stop_at


def answer_letter(text: str, letters: str = "ABCD") -> Optional[str]:
    m = _letter_pattern(letters).search(text)
    return m.group(1) if m else None


def score_multiple_choice(items: Sequence[MultipleChoice], texts: Sequence[str]) -> dict:
    """Accuracy of the letters found in `texts` (one continuation per item) and the per-item predictions."""
    predicted = [answer_letter(t, item.letters) for item, t in zip(items, texts)]
    correct = [p is not None and item.letters.index(p) == item.answer for item, p in zip(items, predicted)]
    return {"accuracy": sum(correct) / len(items), "answered": sum(p is not None for p in predicted) / len(items),
            "predicted": predicted, "correct": correct}


# ----------------------------------------------------------------------------------------------------- Alpaca

def load_alpaca(path, limit: int = 0) -> List[dict]:
    """Alpaca-format records (`instruction`, optional `input`, optional `output`) from a table file."""
    from linalign_jax.data.local import read_table

    path = Path(path)
    table = read_table(path, None)
    if "instruction" not in table:
        raise LinalignError(f"{path}: Alpaca records need an 'instruction' column; found {', '.join(table)}")
    n = len(table["instruction"])
    records = [{"instruction": table["instruction"][i], "input": (table.get("input") or [""] * n)[i] or "",
                "output": (table.get("output") or [""] * n)[i] or ""} for i in range(n)]
    records = [r for r in records if isinstance(r["instruction"], str) and r["instruction"].strip()]
    if not records:
        raise LinalignError(f"{path}: no Alpaca records with a non-empty instruction")
    return records[:limit] if limit else records


def alpaca_prompt(record: dict, fmt: PromptFormat) -> str:
    """The user turn (instruction, then the input) through the chat template, or the Alpaca prompt without one."""
    if fmt.template is not None:
        text = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        return fmt.user(text)
    has_input = bool(record["input"])
    return ALPACA_PROMPT.format(context=", paired with an input that provides further context" if has_input else "",
                                instruction=record["instruction"],
                                input=f"### Input:\n{record['input']}\n\n" if has_input else "")


def alpaca_text(record: dict) -> str:
    """A record as one fitting text (instruction, input and reference output)."""
    return "\n\n".join(p for p in (record["instruction"], record["input"], record["output"]) if p)


def fitting_texts(spec: str, seed: int = 0, text_column: str = "text") -> List[str]:
    """Texts to fit or score a token-level map on: an Alpaca file (instruction + input + output), an MMLU-format file
    (question, choices, answer letter) or any `data.load_texts` spec (`seed` shuffles `public`)."""
    from linalign_jax.data import load_texts
    from linalign_jax.data.local import TABLE_SUFFIXES, read_table

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        columns = read_table(path, None)
        if "instruction" in columns:
            return [alpaca_text(r) for r in load_alpaca(path)]
        if {"question", "choices", "answer"} <= set(columns):
            return [f"{q.prompt()} {q.letters[q.answer]}" for q in load_multiple_choice(path)]
    return load_texts(spec, seed=seed, text_column=text_column)


def write_jsonl(path, records: Sequence[dict]) -> Path:
    """Records as JSON lines, written atomically."""
    from linalign_jax.io_utils import atomic_write_text

    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return Path(path)
