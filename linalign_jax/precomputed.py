"""Embeddings computed elsewhere (API models, vLLM, sentence-transformers) as a model spec: a parquet file that maps
the sha256 of each text to its vector, so any binary that takes a model takes the file instead.

File format (`FORMAT`, one parquet file, suffix .parquet):
    column text_sha256   string   sha256 hex (64 lowercase digits) of the text's UTF-8 bytes, exactly as the
                                  dataset loader returns it (for .txt files: the stripped line)
    column embedding     list<float32>, the same length d in every row
    column text          string, optional; when present every row's hash is checked against it
    schema metadata      b"linalign_embeddings" -> JSON {"format": 1, "model": "<name, e.g. text-embedding-3-large>",
                         "dim": d, "source": "<where the vectors came from>"}

Rows are matched to a dataset's rows by text hash (order and extra rows in the file do not matter); a text with no
row, a hash in two rows, a row of the wrong length, NaN/Inf, a text that does not match its hash, or a file of the
wrong dimension is an error naming the row and the fix. `convert_dump` builds the file from the usual dumps: JSONL
records with an `embedding` field (a top-level list, {"values": [...]}, or an OpenAI batch output's
response.body.data[0].embedding) or a parquet file with a vector column.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from linalign_jax.errors import LinalignError

FORMAT = 1
METADATA_KEY = b"linalign_embeddings"
HASH_COLUMN, VECTOR_COLUMN, TEXT_COLUMN = "text_sha256", "embedding", "text"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_embeddings_spec(spec: str) -> bool:
    """A model spec naming an embeddings file: a path ending in .parquet (no model checkpoint is one)."""
    return str(spec).lower().endswith(".parquet")


@dataclasses.dataclass(frozen=True)
class EmbeddingsFile:
    path: Path
    model: str
    dim: int
    source: str
    vectors: np.ndarray   # [rows, dim] float32
    row_of: Dict[str, int]  # text sha256 -> row

    @property
    def fingerprint(self) -> str:
        """Identifies the embedding function (model name and dim), not the file: two files of the same model's
        vectors fit maps that work on each other's rows."""
        return hashlib.sha256(f"precomputed|{self.model}|{self.dim}".encode()).hexdigest()

    def lookup(self, texts: Sequence[str], data: str = "the data") -> np.ndarray:
        """[len(texts), dim] vectors of `texts` in their order; every text must have a row."""
        hashes = [text_sha256(t) for t in texts]
        missing = [i for i, h in enumerate(hashes) if h not in self.row_of]
        if missing:
            first = texts[missing[0]]
            raise LinalignError(
                f"{self.path}: {len(missing)} of {len(texts)} texts of {data} have no row (first: text "
                f"{missing[0]} {first[:60]!r}, sha256 {hashes[missing[0]][:12]}…); embed them with {self.model} and "
                "convert again, or use the data spec, limit and seed the file was made for")
        return self.vectors[[self.row_of[h] for h in hashes]]


def read_embeddings(path: str | Path, expect_dim: Optional[int] = None) -> EmbeddingsFile:
    """Read and check an embeddings file (see the module docstring)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path).expanduser()
    if not path.is_file():
        raise LinalignError(f"embeddings file {path} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        raise LinalignError(f"{path} is not a readable parquet file ({type(err).__name__}: {err})") from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise LinalignError(f"{path} is not a linalign embeddings file (no {METADATA_KEY.decode()!r} schema metadata); "
                            "build one with python -m experiments.convert_embeddings")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT or not isinstance(meta.get("model"), str) or not isinstance(meta.get("dim"), int):
        raise LinalignError(f"{path}: metadata {meta} is not format {FORMAT} with a model name and an int dim")
    missing = [c for c in (HASH_COLUMN, VECTOR_COLUMN) if c not in table.column_names]
    if missing:
        raise LinalignError(f"{path} has no {' / '.join(map(repr, missing))} column; columns found: "
                            f"{', '.join(map(repr, table.column_names))}")
    dim = meta["dim"]
    if expect_dim is not None and dim != expect_dim:
        raise LinalignError(f"{path}: {meta['model']} vectors have dim {dim}, but {expect_dim} are needed here")
    column = table[VECTOR_COLUMN].combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(lengths != dim)
    if wrong.size:
        raise LinalignError(f"{path}: row {wrong[0]} has {lengths[wrong[0]]} values, but the file's dim is {dim} "
                            f"({wrong.size} rows differ)")
    vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(table), dim)
    bad = np.flatnonzero(~np.isfinite(vectors).all(1))
    if bad.size:
        raise LinalignError(f"{path}: row {bad[0]} has NaN or Inf values ({bad.size} rows do); re-embed those texts")
    hashes = table[HASH_COLUMN].to_pylist()
    row_of: Dict[str, int] = {}
    for row, digest in enumerate(hashes):
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise LinalignError(f"{path}: row {row} has text_sha256 {digest!r}; expected 64 lowercase hex digits")
        if digest in row_of:
            raise LinalignError(f"{path}: rows {row_of[digest]} and {row} hold the same text (sha256 "
                                f"{digest[:12]}…); keep one row per text")
        row_of[digest] = row
    if TEXT_COLUMN in table.column_names:
        for row, (text, digest) in enumerate(zip(table[TEXT_COLUMN].to_pylist(), hashes)):
            if text is not None and text_sha256(text) != digest:
                raise LinalignError(f"{path}: row {row}'s text {text[:60]!r} does not hash to its text_sha256 "
                                    f"{digest[:12]}… (changed after embedding?); fix the row or drop the text column")
    return EmbeddingsFile(path=path, model=meta["model"], dim=dim, source=str(meta.get("source", "")),
                          vectors=vectors, row_of=row_of)


def write_embeddings(path: str | Path, texts: Sequence[str], vectors: np.ndarray, model: str, *, source: str = "",
                     keep_text: bool = True) -> Path:
    """Write `vectors[i]` as the embedding of `texts[i]` (atomically); the format is checked by reading it back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from linalign_jax.io_utils import atomic_path

    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise LinalignError(f"need one vector per text: {len(texts)} texts, vectors of shape {vectors.shape}")
    if not model:
        raise LinalignError("name the model that made the vectors (e.g. --model=text-embedding-3-large)")
    columns = {HASH_COLUMN: pa.array([text_sha256(t) for t in texts], pa.string()),
               VECTOR_COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])}
    if keep_text:
        columns[TEXT_COLUMN] = pa.array(list(texts), pa.string())
    meta = {"format": FORMAT, "model": model, "dim": int(vectors.shape[1]), "source": source}
    table = pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    path = Path(path)
    if not is_embeddings_spec(str(path)):
        raise LinalignError(f"an embeddings file must end in .parquet, got {str(path)!r}")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
        read_embeddings(tmp)
    return path


# --- converters from the common dumps -----------------------------------------------------------------------------


def _record_vector(record: dict, field: str):
    """The vector of one JSONL record: record[field] as a list or {"values": list}, or an OpenAI batch output line."""
    value = record.get(field)
    if value is None and isinstance(record.get("response"), dict):  # OpenAI /v1/embeddings batch output
        data = (record["response"].get("body") or {}).get("data") or [{}]
        value = data[0].get("embedding")
    if isinstance(value, dict):
        value = value.get("values")
    return value


def _record_text(record: dict, field: str):
    if record.get(field) is not None:
        return record[field]
    body = record.get("body")  # an OpenAI batch *input* line: {"custom_id", "body": {"input": text, ...}}
    return body.get("input") if isinstance(body, dict) else None


def _jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise LinalignError(f"{path}:{number}: not valid JSON ({err.msg})") from None


def convert_dump(dump: str | Path, out: str | Path, model: str, *, texts: Optional[str | Path] = None,
                 text_field: str = "text", vector_field: str = "embedding", id_field: str = "custom_id") -> dict:
    """Build an embeddings file from a JSONL or parquet dump; returns a summary.

    Texts come from the dump's `text_field`, or, when `texts` is given, from that file joined on `id_field`
    (JSONL: an OpenAI batch input file, whose lines carry custom_id and body.input) or by line order (.txt).
    """
    dump, out = Path(dump).expanduser(), Path(out)
    if not dump.is_file():
        raise LinalignError(f"dump {dump} does not exist")
    ids: List = []
    vectors: List = []
    dump_texts: List = []
    if dump.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(dump)
        if vector_field not in table.column_names:
            raise LinalignError(f"{dump} has no {vector_field!r} column (columns: {', '.join(table.column_names)}); "
                                "name the vector column with --vector_field")
        vectors = table[vector_field].to_pylist()
        dump_texts = table[text_field].to_pylist() if text_field in table.column_names else [None] * len(vectors)
        ids = table[id_field].to_pylist() if id_field in table.column_names else list(range(len(vectors)))
    elif dump.suffix.lower() == ".jsonl":
        for number, record in _jsonl(dump):
            vector = _record_vector(record, vector_field)
            if not isinstance(vector, list):
                raise LinalignError(f"{dump}:{number}: no {vector_field!r} list (nor an OpenAI batch "
                                    "response.body.data[0].embedding); name the field with --vector_field")
            vectors.append(vector)
            dump_texts.append(record.get(text_field))
            ids.append(record.get(id_field, len(ids)))
    else:
        raise LinalignError(f"{dump}: expected a .jsonl or .parquet dump")
    if not vectors:
        raise LinalignError(f"{dump} holds no embeddings")
    if texts is not None:
        dump_texts = _join_texts(Path(texts).expanduser(), ids, text_field, id_field)
    missing = [i for i, t in enumerate(dump_texts) if not isinstance(t, str)]
    if missing:
        raise LinalignError(f"{dump}: record {missing[0] + 1} has no text ({len(missing)} records lack one); give "
                            f"the field with --text_field or the inputs with --texts")
    lengths = {len(v) for v in vectors}
    if len(lengths) != 1:
        row = next(i for i, v in enumerate(vectors) if len(v) != len(vectors[0]))
        raise LinalignError(f"{dump}: record {row + 1} has {len(vectors[row])} values, record 1 has "
                            f"{len(vectors[0])}; every embedding must have the same length")
    array = np.asarray(vectors, np.float32)
    write_embeddings(out, dump_texts, array, model, source=str(dump))
    return {"out": str(out), "rows": len(dump_texts), "dim": int(array.shape[1]), "model": model}


def _join_texts(path: Path, ids: Sequence, text_field: str, id_field: str) -> List[str]:
    if path.suffix.lower() == ".txt":
        from linalign_jax.data.local import read_lines

        lines = read_lines(path)
        if len(lines) != len(ids):
            raise LinalignError(f"{path} has {len(lines)} texts but the dump has {len(ids)} embeddings; a .txt pairs "
                                "them by line order")
        return lines
    by_id = {}
    for number, record in _jsonl(path):
        by_id[record.get(id_field, number - 1)] = _record_text(record, text_field)
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise LinalignError(f"{path} has no text for {id_field} {missing[0]!r} ({len(missing)} embeddings lack one)")
    return [by_id[i] for i in ids]
