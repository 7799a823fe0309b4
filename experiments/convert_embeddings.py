"""Turn an embeddings dump (API batch output, a vector parquet) into the embeddings file every binary takes as a
model spec (format: `linalign_jax.precomputed`).

    python -m experiments.convert_embeddings --dump=batch_output.jsonl --texts=batch_input.jsonl \
        --model_name=text-embedding-3-large --out=runs/emb/openai_trec.parquet
    python -m experiments.convert_embeddings --dump=vectors.jsonl --model_name=embed-v4.0 --out=cohere.parquet
    python -m experiments.convert_embeddings --dump=vectors.parquet --vector_field=vector --model_name=M --out=m.parquet

--dump: JSONL (one record per text: `embedding` as a list or {"values": [...]}, or an OpenAI batch output line with
response.body.data[0].embedding) or parquet (a list column). Texts: the record's --text_field, or --texts (an
OpenAI batch input JSONL joined on --id_field, or a .txt paired by line order).
"""
from __future__ import annotations

import logging

from absl import flags

from linalign_jax import cli

log = logging.getLogger(__name__)
FLAGS = flags.FLAGS
flags.DEFINE_string("dump", None, "JSONL or parquet file with one embedding per text")
flags.DEFINE_string("model_name", None, "name of the model that made the vectors (recorded in the file; not a spec to load)")
flags.DEFINE_string("out", None, "output embeddings file (.parquet)")
flags.DEFINE_string("texts", None, "texts for a dump without them: batch input JSONL (joined on --id_field) or .txt")
flags.DEFINE_string("text_field", "text", "field / column holding each text")
flags.DEFINE_string("vector_field", "embedding", "field / column holding each vector")
flags.DEFINE_string("id_field", "custom_id", "field joining --dump records to --texts records")
flags.mark_flags_as_required(["dump", "model_name", "out"])


def main(argv):
    from linalign_jax.precomputed import convert_dump

    summary = convert_dump(FLAGS.dump, FLAGS.out, FLAGS.model_name, texts=FLAGS.texts, text_field=FLAGS.text_field,
                           vector_field=FLAGS.vector_field, id_field=FLAGS.id_field)
    log.info(f"wrote {summary['out']}: {summary['rows']} texts × {summary['dim']} dims of {summary['model']}")


if __name__ == "__main__":
    cli.run(main)
