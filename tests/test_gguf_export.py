"""openllm_edu.gguf_export (chapter 14c): GPT-2- and Llama-shaped models and byte-level BPE as GGUF files.

The `gguf` package (llama.cpp's reader and writer) is the oracle: its reader must find the architecture, sizes and
tensors we meant, its Q8_0 dequantisation must equal group-wise int8 computed here by hand, and our model rebuilt from
the file must give the original logits (float32) bit for bit. llama.cpp itself is not run."""
import dataclasses

import numpy as np
import pytest
import torch

from openllm_edu.core import CourseError
from openllm_edu.model import GPT, GPTConfig, course_documents, course_model, save_pretrained
from openllm_edu.tokenizer import CharTokenizer

gguf = pytest.importorskip("gguf", reason="gguf is in the export extra; install it to write GGUF files")
from openllm_edu.gguf_export import GGUF_FILE, export_gguf, read_gguf  # noqa: E402


def random_gpt(**overrides) -> GPT:
    "A tiny GPT-2-shaped model whose every tensor (biases and norm gains included) is random."
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=64, **overrides)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def fields_of(path) -> dict:
    return {name: field.contents() for name, field in gguf.GGUFReader(str(path)).fields.items()}


def tensors_of(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def batch_for(model: GPT) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, model.config.block_size),
                         generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("overrides", [dict(), dict(bias=False), dict(tie_embeddings=False, mlp_hidden=96)],
                         ids=["gpt2", "no-bias", "untied-odd-mlp"])
def test_float32_round_trip_gives_our_logits_exactly(tmp_path, overrides):
    model = random_gpt(**overrides)
    path = export_gguf(model, tmp_path / "out")
    assert path == tmp_path / "out" / GGUF_FILE
    fields = fields_of(path)
    config = model.config
    assert fields["general.architecture"] == "gpt2"
    assert (fields["gpt2.block_count"], fields["gpt2.embedding_length"], fields["gpt2.context_length"],
            fields["gpt2.attention.head_count"], fields["gpt2.feed_forward_length"]) == (
        config.n_layer, config.n_embd, config.block_size, config.n_head, config.mlp_hidden_size)
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(config.norm_eps)
    tensors = tensors_of(path)
    qkv = tensors["blk.1.attn_qkv.weight"]
    assert qkv.shape.tolist() == [config.n_embd, 3 * config.n_embd]  # ggml order: (out, in) listed as [in, out]
    assert np.array_equal(qkv.data, model.blocks[1].attn.c_attn.weight.detach().numpy())
    assert ("output.weight" in tensors) == (not config.tie_embeddings)
    back, tokenizer = read_gguf(path)
    assert tokenizer is None
    assert back.config.bias == config.bias and back.config.tie_embeddings == config.tie_embeddings
    batch = batch_for(model)
    with torch.no_grad():
        assert torch.equal(back(batch)[0], model(batch)[0])


def test_float16_stores_block_matrices_rounded_and_nothing_else(tmp_path):
    model = random_gpt()
    back, _ = read_gguf(export_gguf(model, tmp_path / "f16", dtype="f16"))
    for name, ours in model.state_dict().items():
        theirs = back.state_dict()[name]
        rounded = name.startswith("blocks.") and ours.ndim == 2
        assert torch.equal(theirs, ours.half().float() if rounded else ours), name


def test_q8_0_is_int8_in_blocks_of_32_with_a_float16_scale(tmp_path):
    model = random_gpt()
    path = export_gguf(model, tmp_path / "q8", dtype="q8_0")
    stored = tensors_of(path)["blk.0.ffn_down.weight"]
    assert stored.tensor_type == gguf.GGMLQuantizationType.Q8_0
    weight = model.blocks[0].mlp.c_proj.weight.detach().double()
    assert stored.data.nbytes == weight.numel() // 32 * 34  # 32 int8 and one float16 per block
    blocks = weight.reshape(-1, 32)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 127
    expected = (torch.round(blocks / scale).clamp(-127, 127) * scale.half().double()).reshape(weight.shape)
    back, _ = read_gguf(path)
    got = back.blocks[0].mlp.c_proj.weight.detach().double()
    step = scale.half().double().expand(-1, 32).reshape(weight.shape)
    assert ((got - expected).abs() <= step * 1.0001).all()  # at most one int8 step apart (x/s vs x*(1/s))
    assert ((got - expected).abs() > 1e-12).float().mean() < 0.01  # and almost always equal
    assert torch.equal(back.wte.weight, model.wte.weight)  # embeddings and norms stay float32
    assert torch.equal(back.blocks[0].ln_1.weight, model.blocks[0].ln_1.weight)


def test_the_course_model_and_its_tokenizer_round_trip(tmp_path):
    model, tokenizer = course_model("ci")
    path = export_gguf(save_pretrained(model, tmp_path / "ours", tokenizer), tmp_path / "gguf")  # from a folder
    fields = fields_of(path)
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == tokenizer.vocab_size
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert fields["tokenizer.ggml.token_type"][tokenizer.eos_id] == 3 and fields["tokenizer.ggml.token_type"][0] == 1
    assert len(fields["tokenizer.ggml.merges"]) == len(tokenizer.merges)
    back, back_tokenizer = read_gguf(path.parent)  # the folder works too
    _, held_out = course_documents("ci")
    for document in held_out:
        assert back_tokenizer.encode(document) == tokenizer.encode(document)
    batch = torch.tensor([tokenizer.encode(d)[: model.config.block_size] for d in held_out[:2]])
    with torch.no_grad():
        assert torch.equal(back(batch)[0], model(batch)[0])


def llama_gpt(**overrides) -> GPT:
    "A tiny Llama-shaped model (RoPE, RMSNorm, SwiGLU, grouped-query attention) with every tensor random."
    torch.manual_seed(0)
    values = dict(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, bias=False,
                  norm="rmsnorm", mlp="swiglu", pos="rope", rope_base=500.0) | overrides
    model = GPT(GPTConfig(**values)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("overrides", [dict(), dict(tie_embeddings=False, n_kv_head=1, mlp_hidden=96)],
                         ids=["tied-gqa", "untied-mqa"])
def test_llama_shaped_models_round_trip_exactly(tmp_path, overrides):
    model = llama_gpt(**overrides)
    path = export_gguf(model, tmp_path / "llama")
    fields, tensors = fields_of(path), tensors_of(path)
    config = model.config
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.attention.head_count_kv"], fields["llama.rope.dimension_count"],
            fields["llama.feed_forward_length"]) == (config.num_kv_heads, config.head_dim, config.mlp_hidden_size)
    assert fields["llama.rope.freq_base"] == pytest.approx(config.rope_base)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.norm_eps)
    d, kv_rows = config.head_dim, config.num_kv_heads * config.head_dim
    c_attn = model.blocks[0].attn.c_attn.weight.detach()
    v = c_attn[config.n_embd + kv_rows:]
    assert np.array_equal(tensors["blk.0.attn_v.weight"].data, v.numpy())  # values are not reordered
    k_rows = torch.from_numpy(np.array(tensors["blk.0.attn_k.weight"].data))
    our_k = c_attn[config.n_embd:config.n_embd + kv_rows]
    for head in range(config.num_kv_heads):  # adjacent pairs: file rows 2i, 2i+1 = our rows i, i + d/2 of the head
        for i in range(d // 2):
            assert torch.equal(k_rows[head * d + 2 * i], our_k[head * d + i])
            assert torch.equal(k_rows[head * d + 2 * i + 1], our_k[head * d + i + d // 2])
    gate, up = model.blocks[1].mlp.c_fc.weight.detach().chunk(2)
    assert np.array_equal(tensors["blk.1.ffn_gate.weight"].data, gate.numpy())
    assert np.array_equal(tensors["blk.1.ffn_up.weight"].data, up.numpy())
    back, _ = read_gguf(path)
    assert back.config == dataclasses.replace(config, mlp_hidden=config.mlp_hidden_size)  # the file has the width
    batch = batch_for(model)
    with torch.no_grad():
        assert torch.equal(back(batch)[0], model(batch)[0])


@pytest.mark.parametrize("overrides, fix", [
    (dict(pos="rope"), "norm="),
    (dict(norm="rmsnorm"), "norm="),
    (dict(pos="rope", norm="rmsnorm", mlp="swiglu", window=8, bias=False), "window=8"),
    (dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=True), "bias=True"),
    (dict(qk_norm=True), "qk_norm=True"),
    (dict(mlp="relu2"), "mlp='relu2'"),
], ids=["rope-layernorm", "rmsnorm-learned", "window", "llama-bias", "qk-norm", "relu2"])
def test_configs_gguf_cannot_hold_are_refused_and_leave_nothing(tmp_path, overrides, fix):
    model = GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=32, **overrides))
    with pytest.raises(CourseError, match=fix):
        export_gguf(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_requests_are_refused_in_one_line(tmp_path):
    model = random_gpt()
    with pytest.raises(CourseError, match="dtype='q4'"):
        export_gguf(model, tmp_path / "a", dtype="q4")
    (tmp_path / "taken").mkdir()
    with pytest.raises(CourseError, match="already exists"):
        export_gguf(model, tmp_path / "taken")
    with pytest.raises(CourseError, match="only the byte-level BPE"):
        export_gguf(model, tmp_path / "char", tokenizer=CharTokenizer().train("abc"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing half-written
    damaged = tmp_path / "taken" / GGUF_FILE
    damaged.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(CourseError, match="not a readable GGUF file"):
        read_gguf(damaged)
    whole = export_gguf(model, tmp_path / "whole")
    for cut in (100, whole.stat().st_size // 2, whole.stat().st_size - 10):
        damaged.write_bytes(whole.read_bytes()[:cut])
        with pytest.raises(CourseError, match="not a readable GGUF file"):
            read_gguf(damaged)
    with pytest.raises(CourseError, match="is not a file"):
        read_gguf(tmp_path / "missing.gguf")
