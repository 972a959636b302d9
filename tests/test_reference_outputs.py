"""Our tokenizers and model against references from outside this project (CS336 style).

The fixtures in tests/fixtures/reference/ are regenerated with `python tests/fixtures/reference/make_references.py`:
- BPE: Hugging Face `tokenizers`' byte-level BPE, trained on a text with no tie between equally frequent pairs in
  its first merges (implementations break ties differently), so any correct BPE must learn the same merges.
- SentencePiece: the `sentencepiece` library trained directly with the recipe chapter 02 describes.
- GPT: logits of two tiny models (GPT-2 style, Llama style) from stored weights. Tolerance 1e-5 absolute and
  relative: fp32 on a CPU, where another BLAS or thread count only reorders sums (differences near 1e-6).
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from openllm_edu.fast_bpe import FastBPETokenizer, train_bpe_incremental
from openllm_edu.model import GPT, GPTConfig
from openllm_edu.tokenizer import BPETokenizer, SentencePieceTokenizer, train_bpe_naive

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
TEXT = (FIXTURES / "training_text.txt").read_text(encoding="utf-8")
BPE = json.loads((FIXTURES / "bpe_tokenizers.json").read_text(encoding="utf-8"))
SENTENCEPIECE = json.loads((FIXTURES / "sentencepiece.json").read_text(encoding="utf-8"))
LOGITS_TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def _generator_script():
    spec = importlib.util.spec_from_file_location("make_references", FIXTURES / "make_references.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _merged_bytes(merges) -> list[list[str]]:
    "Our merges ((left id, right id), new id) as the hex of the two byte strings merged, in order."
    token_bytes = [bytes([i]) for i in range(256)]
    pairs = []
    for (left, right), new_id in merges:
        assert new_id == len(token_bytes)
        pairs.append([token_bytes[left].hex(), token_bytes[right].hex()])
        token_bytes.append(token_bytes[left] + token_bytes[right])
    return pairs


@pytest.mark.parametrize("train", [train_bpe_naive, train_bpe_incremental])
def test_bpe_learns_the_merges_of_hugging_face_tokenizers(train):
    merges = train(TEXT, 256 + len(BPE["merges"]), "gpt2")
    assert _merged_bytes(merges) == BPE["merges"]


@pytest.mark.parametrize("kind", [BPETokenizer, FastBPETokenizer])
def test_bpe_splits_text_as_hugging_face_tokenizers_does(kind):
    tokenizer = kind(split_pattern="gpt2").train(TEXT, 256 + len(BPE["merges"]) + 1)  # + <|endoftext|>
    for text, tokens in BPE["probes"].items():
        ids = tokenizer.encode(text)
        assert [tokenizer.token_bytes[i].hex() for i in ids] == tokens, text
        assert tokenizer.decode(ids) == text


def test_sentencepiece_tokenizer_gives_the_librarys_own_pieces():
    import sentencepiece as spm
    tokenizer = SentencePieceTokenizer().train(TEXT, SENTENCEPIECE["options"]["vocab_size"])
    pieces = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
    for text, expected in SENTENCEPIECE["probes"].items():
        ids = tokenizer.encode(text)
        assert [pieces.id_to_piece(i) for i in ids] == expected, text
        assert tokenizer.decode(ids) == text


def test_the_fixtures_are_what_the_libraries_produce(tmp_path):
    "Guards the fixtures: regenerated with today's libraries, they come out the same (not hand-edited)."
    pytest.importorskip("tokenizers", reason="the dev extra installs tokenizers")
    script = _generator_script()
    assert not script.ties_in_bpe(TEXT, len(BPE["merges"]))
    fresh = script.hf_bpe_reference(TEXT)
    assert (fresh["merges"], fresh["probes"]) == (BPE["merges"], BPE["probes"])
    fresh = script.sentencepiece_reference(TEXT, tmp_path)
    assert (fresh["options"], fresh["probes"]) == (SENTENCEPIECE["options"], SENTENCEPIECE["probes"])


def test_the_tie_check_finds_a_tie():
    script = _generator_script()
    assert script.ties_in_bpe("ab cd", 1) == [0]  # (a, b) and (c, d) both occur once
    assert script.ties_in_bpe("ab ab cd", 1) == []


def _snapshot(name: str) -> tuple[GPT, torch.Tensor, torch.Tensor]:
    with safe_open(FIXTURES / "gpt_outputs.safetensors", framework="pt") as f:
        config = GPTConfig.from_dict(json.loads(f.metadata()[name]))
        prefix = f"{name}.weights."
        weights = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        inputs, logits = f.get_tensor("input_ids"), f.get_tensor(f"{name}.logits")
    model = GPT(config).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if config.tie_embeddings else [])
    return model, inputs, logits


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_gpt_logits_match_the_stored_snapshot(name):
    model, inputs, expected = _snapshot(name)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs)[0], expected, **LOGITS_TOLERANCE)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_gpt_kv_cache_decoding_matches_the_stored_snapshot(name):
    "Feeding the tokens one at a time through the KV cache gives the snapshot's logits at every position."
    model, inputs, expected = _snapshot(name)
    cache = model.new_kv_cache(inputs.shape[0])
    with torch.no_grad():
        steps = [model(inputs[:, t:t + 1], kv_cache=cache)[0] for t in range(inputs.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, **LOGITS_TOLERANCE)
