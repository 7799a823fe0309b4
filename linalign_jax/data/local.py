"""Read user-supplied text tables (CSV / TSV / JSONL / JSON / parquet) and plain .txt files into columns.

Values are read exactly: the csv module and json.loads do no type guessing, so a text "NA" or "None" stays a string
(pandas would turn it into a missing value). CSV labels that are all integer literals become ints.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Dict, List

from linalign_jax.errors import LinalignError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
_INT = re.compile(r"^-?\d+$")


def read_table(path: Path, columns: List[str] | None, int_column: str | None = None) -> Dict[str, list]:
    """`columns` of the table at `path` (None: all of them); LinalignError naming the columns found when one is
    missing. A CSV / TSV `int_column` whose values are all integer literals is returned as ints."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        table = _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        table = _records_to_columns(path, _read_jsonl(path))
    elif suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise LinalignError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        table = _records_to_columns(path, records)
    elif suffix == ".parquet":
        import pyarrow.parquet

        table = pyarrow.parquet.read_table(path).to_pydict()
    else:
        raise LinalignError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(TABLE_SUFFIXES)}")
    columns = list(table) if columns is None else columns
    missing = [c for c in columns if c not in table]
    if missing:
        raise LinalignError(f"{path} has no {' / '.join(map(repr, missing))} column; "
                            f"columns found: {', '.join(map(repr, table)) or 'none'} (name yours with "
                            "--text_column / --label_column)")
    if suffix in (".csv", ".tsv") and int_column in columns and all(_INT.match(v or "") for v in table[int_column]):
        table[int_column] = [int(v) for v in table[int_column]]
    return {c: table[c] for c in columns}


def read_lines(path: Path) -> List[str]:
    """The lines of a text file, stripped, in file order: row i is line i + 1.

    The same rule as a table's text cells: a blank text is an error, never dropped (dropping would shift every later
    row against its line number). Blank lines after the last text are not rows.
    """
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blank = [number for number, line in enumerate(lines, start=1) if not line]
    if blank:
        raise LinalignError(f"{path}: line {blank[0]} is blank ({len(blank)} blank line(s) before the last text); "
                            "every line is one text (row i = line i + 1): remove blank lines, e.g. "
                            f"sed -i '/^[[:space:]]*$/d' {path}")
    return lines


def find_split_files(directory: Path) -> Dict[str, Path]:
    """{'train': path[, 'test': path]} for a directory holding train.<ext> and optionally test.<ext>."""
    found = {}
    for split in ("train", "test"):
        candidates = [path for path in (directory / f"{split}{suffix}" for suffix in TABLE_SUFFIXES) if path.is_file()]
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise LinalignError(f"{directory}: several {split} files ({names}); keep one")
        if candidates:
            found[split] = candidates[0]
    if "train" not in found:
        listing = ", ".join(sorted(p.name for p in directory.iterdir())[:12]) or "nothing"
        raise LinalignError(f"{directory}: expected train.<ext> (and optionally test.<ext>) with ext in "
                            f"{', '.join(TABLE_SUFFIXES)}, or a saved DatasetDict; found {listing}")
    return found


def _read_csv(path: Path, delimiter: str) -> Dict[str, list]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        rows = list(reader)
        fields = reader.fieldnames or []
    return {field: [row[field] for row in rows] for field in fields}


def _read_jsonl(path: Path) -> List[dict]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise LinalignError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return records


def _records_to_columns(path: Path, records: List[dict]) -> Dict[str, list]:
    columns: Dict[str, list] = {}
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise LinalignError(f"{path}: record {number} is a {type(record).__name__}, expected an object")
        for key in record:
            columns.setdefault(key, [])
    for key, values in columns.items():
        values.extend(record.get(key) for record in records)
    return columns

