"""Precomputed embeddings as a model spec: the file format, matching by text hash, every bad file, the converter."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from linalign_jax.embedders import open_embedder
from linalign_jax.errors import LinalignError
from linalign_jax.precomputed import METADATA_KEY, convert_dump, read_embeddings, text_sha256, write_embeddings

TEXTS = [f"sentence number {i}" for i in range(6)]
VECTORS = np.arange(18, dtype=np.float32).reshape(6, 3) + 1


def test_rows_are_matched_by_text_hash_whatever_the_order(tmp_path):
    path = write_embeddings(tmp_path / "e.parquet", TEXTS[::-1], VECTORS[::-1], "api-model-v1", source="test")
    emb = open_embedder(str(path))
    assert emb.info() == {"spec": str(path), "fingerprint": emb.fingerprint, "family": "precomputed", "dim": 3}
    wanted = [TEXTS[4], TEXTS[0], TEXTS[4]]  # any order, repeats allowed, a subset of the file
    np.testing.assert_array_equal(emb.features(wanted).array, VECTORS[[4, 0, 4]])
    unit = emb.features(wanted, normalize=True).array
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    assert emb.features(wanted).metadata["pooling"] == "precomputed"
    # the fingerprint names the embedding function, not the file: a second file of the same model agrees
    other = write_embeddings(tmp_path / "f.parquet", TEXTS[:2], VECTORS[:2], "api-model-v1", keep_text=False)
    assert read_embeddings(other).fingerprint == emb.fingerprint
    assert read_embeddings(write_embeddings(tmp_path / "g.parquet", TEXTS, VECTORS, "other")).fingerprint != \
        emb.fingerprint


def _raw(path, hashes, vectors, meta=None, texts=None):
    columns = {"text_sha256": hashes, "embedding": pa.array(vectors, pa.list_(pa.float32()))}
    if texts is not None:
        columns["text"] = texts
    table = pa.table(columns)
    if meta is not False:
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta or {"format": 1, "model": "m",
                                                                                 "dim": 3}).encode()})
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("case, message", [
    ("no_metadata", r"is not a linalign embeddings file .*experiments.convert_embeddings"),
    ("ragged", r"row 1 has 2 values, but the file's dim is 3"),
    ("nan", r"row 0 has NaN or Inf values"),
    ("duplicate", r"rows 0 and 1 hold the same text .*keep one row per text"),
    ("bad_hash", r"row 0 has text_sha256 'abc'; expected 64 lowercase hex"),
    ("mismatched_text", r"row 1's text 'not the text' does not hash to its text_sha256"),
])
def test_bad_embeddings_files(tmp_path, case, message):
    h = [text_sha256(t) for t in TEXTS[:2]]
    good = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    path = tmp_path / "bad.parquet"
    if case == "no_metadata":
        _raw(path, h, good, meta=False)
    elif case == "ragged":
        _raw(path, h, [[1.0, 2.0, 3.0], [4.0, 5.0]])
    elif case == "nan":
        _raw(path, h, [[np.nan, 2.0, 3.0], [4.0, 5.0, 6.0]])
    elif case == "duplicate":
        _raw(path, [h[0], h[0]], good)
    elif case == "bad_hash":
        _raw(path, ["abc", h[1]], good)
    else:
        _raw(path, h, good, texts=[TEXTS[0], "not the text"])
    with pytest.raises(LinalignError, match=message):
        read_embeddings(path)


def test_missing_texts_and_wrong_dims_name_the_fix(tmp_path):
    path = write_embeddings(tmp_path / "e.parquet", TEXTS[:3], VECTORS[:3], "api-model-v1")
    with pytest.raises(LinalignError, match=r"2 of 3 texts of task.csv have no row \(first: text 1 'sentence number "
                                            r"4'.*embed them with api-model-v1"):
        open_embedder(str(path)).features([TEXTS[0], TEXTS[4], TEXTS[5]], data="task.csv")
    with pytest.raises(LinalignError, match=r"api-model-v1 vectors have dim 3, but 768 are needed here"):
        open_embedder(str(path), expect_dim=768)
    with pytest.raises(LinalignError, match=r"embeddings file .*nope.parquet does not exist"):
        open_embedder(str(tmp_path / "nope.parquet"))


def test_converter_reads_api_dumps(tmp_path):
    # an OpenAI batch: input lines carry the texts, output lines (in any order) the vectors, joined on custom_id
    inputs = tmp_path / "batch_input.jsonl"
    inputs.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings",
                                          "body": {"model": "text-embedding-3-small", "input": t}}) + "\n"
                              for i, t in enumerate(TEXTS)))
    outputs = tmp_path / "batch_output.jsonl"
    outputs.write_text("".join(json.dumps({"id": f"b{i}", "custom_id": f"r{i}", "response": {
        "status_code": 200, "body": {"data": [{"index": 0, "embedding": VECTORS[i].tolist()}]}}}) + "\n"
        for i in reversed(range(6))))
    summary = convert_dump(outputs, tmp_path / "openai.parquet", "text-embedding-3-small", texts=inputs)
    assert summary == {"out": str(tmp_path / "openai.parquet"), "rows": 6, "dim": 3, "model": "text-embedding-3-small"}
    np.testing.assert_array_equal(open_embedder(summary["out"]).features(TEXTS).array, VECTORS)
    # a plain JSONL with text + embedding ({"values": [...]} as Gemini writes it) and a parquet vector column
    plain = tmp_path / "gemini.jsonl"
    plain.write_text("".join(json.dumps({"text": t, "embedding": {"values": v.tolist()}}) + "\n"
                             for t, v in zip(TEXTS, VECTORS)))
    np.testing.assert_array_equal(open_embedder(convert_dump(plain, tmp_path / "g.parquet", "gemini")["out"])
                                  .features(TEXTS).array, VECTORS)
    table = tmp_path / "vectors.parquet"
    pq.write_table(pa.table({"sentence": TEXTS, "vec": pa.array(VECTORS.tolist(), pa.list_(pa.float32()))}), table)
    out = convert_dump(table, tmp_path / "p.parquet", "st-model", text_field="sentence", vector_field="vec")["out"]
    np.testing.assert_array_equal(open_embedder(out).features(TEXTS).array, VECTORS)
    with pytest.raises(LinalignError, match=r"vectors.parquet has no 'embedding' column .*--vector_field"):
        convert_dump(table, tmp_path / "q.parquet", "st-model", text_field="sentence")
    with pytest.raises(LinalignError, match=r"record 1 has no text .*--text_field or the inputs with --texts"):
        convert_dump(outputs, tmp_path / "r.parquet", "m")
