"""The paper's generation protocol: chat templates (against transformers' rendering), multiple choice with early
stop, Alpaca records, JSONL outputs and the sweep binary end to end on tiny decoders."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from linalign_jax.align.maps import AffineMap
from linalign_jax.errors import LinalignError
from linalign_jax.generate import HybridPair, generate_batch, protocol
from linalign_jax.models.tokenizer import load_tokenizer
from tests.test_generate import tiny_decoder

FIXTURES = Path(__file__).parent / "fixtures"
MC_FILE = FIXTURES / "generate" / "mc_small.jsonl"
ALPACA_FILE = FIXTURES / "generate" / "alpaca_small.jsonl"
ROOT = Path(__file__).resolve().parents[1]


def test_chat_templates_render_as_transformers_does():
    """SmolLM2-Instruct's template is read from its GGUF metadata and renders (and encodes) exactly as transformers'
    apply_chat_template; gemma-3-270m is a base model and has none."""
    model_dir = protocol.model_directory("SmolLM2-135M-Instruct")
    tokenizer = load_tokenizer(model_dir)
    fmt = protocol.prompt_format(tokenizer, model_dir)
    assert fmt.template is not None and not fmt.add_special_tokens
    golden = json.loads((FIXTURES / "generate" / "chat_SmolLM2-135M-Instruct.json").read_text())
    for case in golden["cases"]:
        rendered = protocol.render_chat(fmt.template, case["messages"], **fmt.special_tokens)
        assert rendered == case["rendered"]
        assert tokenizer.encode(rendered, add_special_tokens=False).ids == case["ids"]
    assert fmt.user(golden["cases"][0]["messages"][0]["content"]) == golden["cases"][0]["rendered"]
    assert protocol.read_chat_template(protocol.model_directory("gemma-3-270m")) is None
    with pytest.raises(LinalignError, match="chat template: no"):
        protocol.render_chat("{{ raise_exception('no') }}", [])


def test_answer_letters_stop_decoding_at_the_first_valid_one():
    stop = protocol.answer_stop("ABCD")
    assert stop(" The answer is B.") == len(" The answer is B")
    assert stop(" Answer: (C) because") == len(" Answer: (C")
    assert stop(" An apple a day") == -1 and stop(" E is wrong") == -1
    assert protocol.answer_letter(" I think D, not A", "ABCD") == "D"
    items = protocol.load_multiple_choice(MC_FILE)
    assert len(items) == 8 and items[3].answer == 1 and items[5].answer == 0  # letters "B", "A" → indices
    assert items[0].prompt() == "What is the capital of France?\nA. Berlin\nB. Paris\nC. Madrid\nD. Rome\nAnswer:"
    scored = protocol.score_multiple_choice(items[:3], [" B", " none", " A. Carbon"])
    assert scored["predicted"] == ["B", None, "A"] and scored["correct"] == [True, False, True]
    assert scored["accuracy"] == pytest.approx(2 / 3) and scored["answered"] == pytest.approx(2 / 3)


def test_bad_protocol_files_are_rejected(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?", "choices": ["x", "y"], "answer": 5}) + "\n")
    with pytest.raises(LinalignError, match="answer index"):
        protocol.load_multiple_choice(bad)
    bad.write_text(json.dumps({"question": "Q?", "choices": "x", "answer": 0}) + "\n")
    with pytest.raises(LinalignError, match="choices must be a list"):
        protocol.load_multiple_choice(bad)
    bad.write_text(json.dumps({"prompt": "no instruction"}) + "\n")
    with pytest.raises(LinalignError, match="instruction"):
        protocol.load_alpaca(bad)


def test_alpaca_prompts_and_jsonl(tmp_path):
    records = protocol.load_alpaca(ALPACA_FILE)
    plain = protocol.alpaca_prompt(records[1], protocol.PromptFormat(template=None))
    assert plain.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Input:\nThe cat sleeps on the sofa.\n\n### Response:\n" in plain
    chat = protocol.PromptFormat(template="{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    assert protocol.alpaca_prompt(records[1], chat) == "<user>Translate the sentence into French.\n\nThe cat sleeps on " \
                                                      "the sofa."
    out = protocol.write_jsonl(tmp_path / "o.jsonl", [{"a": "naïve"}, {"b": 2}])
    assert [json.loads(line) for line in out.read_text().splitlines()] == [{"a": "naïve"}, {"b": 2}]


def test_multiple_choice_generation_stops_at_the_first_valid_letter():
    """On a tiny decoder: a greedy MC run biased towards " B" stops right after the letter and scores the items."""
    model = tiny_decoder("llama_gqa", "SmolLM2-135M-Instruct", 1)
    items = protocol.load_multiple_choice(MC_FILE, limit=4)
    d = model.hidden_size
    b_token = model.tokenizer.encode(" B", add_special_tokens=False).ids[0]
    row = np.asarray(model.params["lm_head"])[:, b_token]
    pair = HybridPair(model, model, AffineMap(W=np.zeros((d, d), np.float32), b=(50 * row / np.linalg.norm(row))
                                              .astype(np.float32)))
    prompts = [q.prompt() for q in items]
    biased = pair.generate_batch(prompts, max_new_tokens=16, stop_at=protocol.answer_stop(), batch_size=4)
    assert all(r.text == " B" and r.finish_reason == "stop" and len(r.token_ids) == 1 for r in biased)
    assert protocol.score_multiple_choice(items, [r.text for r in biased])["accuracy"] == 0.5  # answers 1,2,0,1
    native = generate_batch(model, prompts, max_new_tokens=12, stop_at=protocol.answer_stop(), batch_size=4)
    for r in native:  # a random model: whatever it says, a row stops exactly at its first valid letter, if any
        letter = protocol.answer_letter(r.text)
        assert (r.finish_reason == "stop") == (letter is not None)
        assert letter is None or r.text.endswith(letter)


def test_sweep_end_to_end(tmp_path):
    """Two tiny decoders with different (real) tokenizers through the sweep binary's run():
    table, scatter PNG, JSONL records, maps; bad --pair values exit with one line."""
    from experiments import generate_sweep

    fit = tmp_path / "fit.txt"
    fit.write_text("\n".join(f"Sentence {i} about maps, tokens and naïve cafés number {i}." for i in range(12)) + "\n")
    models = {"tiny-smol": tiny_decoder("llama_gqa", "SmolLM2-135M-Instruct", 1),
              "tiny-gemma": tiny_decoder("gemma3_sliding", "gemma-3-270m", 2)}
    out = tmp_path / "sweep"
    config = {"pair": ["tiny-gemma=>tiny-smol"], "fit_data": str(fit), "fit_texts": 8,
              "heldout_texts": 4, "heldout_tokens": 16, "mc_data": str(MC_FILE), "mc_limit": 3,
              "alpaca_data": str(ALPACA_FILE), "alpaca_limit": 1, "max_new_tokens": 6, "max_length": 32,
              "batch_size": 4, "dtype": "float32", "data_seed": 0, "text_column": "text", "out_dir": str(out),
              "ridge_lambda": 1e-4}
    results = generate_sweep.run(config, "test", load=lambda spec, dtype: models[spec])
    assert results["complete"] and len(results["pairs"]) == 1
    assert json.loads((out / "results.json").read_text())["n_records"] == results["n_records"]
    for p in results["pairs"]:
        assert set(p["multiple_choice"]) == {"hybrid", "native_target", "hybrid_vs_native"}
        assert 0 <= p["tokenizers"]["exact_token_match"] <= 1 and p["quality"]["value"] is not None
    records = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(records) == results["n_records"] == 2 * (3 + 1)  # modes × (questions + instructions)
    assert {r["task"] for r in records} == {"multiple_choice", "alpaca"}
    assert (out / "compat_vs_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| vocab Jaccard |" in (out / "results.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "experiments.generate_sweep", "--pair=only-one", f"--out_dir={out}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "SOURCE=>TARGET" in bad.stderr
    assert json.loads((out / "results.json").read_text())["n_records"] == results["n_records"]  # old run untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
