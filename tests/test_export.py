"""openllm_edu.export (chapter 14): our GPT-2-shaped models and byte-level BPE in Hugging Face transformers.

transformers and tokenizers are the oracles: the exported folder, loaded with AutoModelForCausalLM and AutoTokenizer
and no code of ours, must give our logits (within 1e-5; exactly 0 expected in float32), our greedy tokens and our
ids. Configs GPT-2 can't represent are refused naming the field, and a failed export leaves nothing behind."""
import pytest
import torch

from openllm_edu import export
from openllm_edu.core import CourseError
from openllm_edu.export import byte_level_string, byte_to_unicode, export_hf, gpt2_config, gpt2_state_dict
from openllm_edu.generate import GenerationConfig, generate
from openllm_edu.model import GPT, GPTConfig, course_documents, course_model, save_pretrained
from openllm_edu.tokenizer import CharTokenizer

LOGIT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def transformers():
    module = pytest.importorskip("transformers", reason="transformers is in the export extra; install it to check "
                                                        "exports against it")
    module.logging.set_verbosity_error()
    return module


def random_gpt(**overrides) -> GPT:
    "A tiny GPT-2-shaped model whose every tensor (biases and norm gains included) is random, so no mapping hides."
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=64, **overrides)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def greedy_ids(model: GPT, prompt: torch.Tensor, eos_id: int | None) -> list[int]:
    config = GenerationConfig(max_new_tokens=20, temperature=0.0, stop_at_eos=eos_id is not None)
    return generate(model, prompt, config, eos_id=eos_id)[0].tolist()


def assert_same_model(ours: GPT, folder, transformers, batch: torch.Tensor, eos_id: int | None = None):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(theirs).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        difference = (theirs(batch).logits - ours(batch)[0]).abs().max().item()
    assert difference <= LOGIT_TOLERANCE, f"max |logit difference| {difference}"
    prompt = batch[:1, :8]
    with torch.no_grad():
        their_ids = theirs.generate(prompt, max_new_tokens=20, do_sample=False,
                                    **({} if eos_id is not None else dict(eos_token_id=None, pad_token_id=0)))
    assert their_ids[0].tolist() == greedy_ids(ours, prompt, eos_id)


@pytest.mark.parametrize("overrides", [dict(), dict(bias=False), dict(tie_embeddings=False),
                                       dict(mlp_hidden=96, norm_eps=1e-3, bias=False, tie_embeddings=False)],
                         ids=["gpt2", "no-bias", "untied", "odd-sizes"])
def test_random_models_load_in_transformers_with_our_logits(transformers, tmp_path, overrides):
    model = random_gpt(**overrides)
    folder = export_hf(model, tmp_path / "hf")
    batch = torch.randint(0, model.config.vocab_size, (3, model.config.block_size),
                          generator=torch.Generator().manual_seed(1))
    assert_same_model(model, folder, transformers, batch)


def test_the_trained_course_model_and_its_tokenizer_export_exactly(transformers, tmp_path):
    model, tokenizer = course_model("ci")
    folder = export_hf(save_pretrained(model, tmp_path / "ours", tokenizer), tmp_path / "hf")  # from a folder
    _, held_out = course_documents("ci")
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    for document in held_out:
        ids = auto(document)["input_ids"]
        assert ids == tokenizer.encode(document)
        assert auto.decode(ids) == document
    spaced = "Stop , he said . Isn 't it ? Do n't !"  # decoding must not 'clean up' spaces before punctuation
    assert auto.decode(auto(spaced)["input_ids"]) == spaced
    block = model.config.block_size
    batch = torch.tensor([tokenizer.encode(d)[:block] for d in held_out[:2]])
    assert_same_model(model, folder, transformers, batch, eos_id=tokenizer.eos_id)


def test_our_gelu_is_transformers_exact_gelu(transformers):
    from transformers.activations import ACT2FN

    x = torch.linspace(-8, 8, 4001)
    ours = random_gpt().blocks[0].mlp.gelu
    activation = gpt2_config(GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=4, n_embd=64))[
        "activation_function"]
    assert torch.equal(ACT2FN[activation](x), ours(x))
    assert not torch.equal(ACT2FN["gelu_new"](x), ours(x)), "the tanh approximation must differ, or this proves nothing"


@pytest.mark.parametrize("field, value", [("norm", "rmsnorm"), ("mlp", "swiglu"), ("pos", "rope"),
                                          ("n_kv_head", 2), ("window", 8)])
def test_configs_gpt2_cannot_represent_are_refused_naming_the_field(tmp_path, field, value):
    config = GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=4, n_embd=64, **{field: value})
    with pytest.raises(CourseError, match=rf"^{field}=") as refused:
        gpt2_config(config)
    assert "\n" not in str(refused.value)
    with pytest.raises(CourseError, match=rf"^{field}="):
        gpt2_state_dict(GPT(config))
    with pytest.raises(CourseError, match=rf"^{field}="):
        export_hf(GPT(config), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_a_crash_while_writing_leaves_no_folder(tmp_path, monkeypatch):
    def full_disk(tensors, path):
        path.write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_weights", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_hf(random_gpt(), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_refused_and_kept(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(CourseError, match="already exists"):
        export_hf(random_gpt(), tmp_path / "hf")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["notes.txt"]


def test_gpt2_tensors_are_transposed_linear_weights_and_zero_biases():
    model = random_gpt(bias=False)
    tensors = gpt2_state_dict(model)
    fc = model.blocks[1].mlp.c_fc.weight
    assert torch.equal(tensors["transformer.h.1.mlp.c_fc.weight"], fc.T)
    assert not torch.equal(tensors["transformer.h.1.attn.c_proj.weight"], model.blocks[1].attn.c_proj.weight)
    assert torch.count_nonzero(tensors["transformer.h.0.attn.c_attn.bias"]) == 0
    assert "lm_head.weight" not in tensors  # tied: transformers shares wte


def test_byte_table_matches_tokenizers_byte_level():
    pre_tokenizers = pytest.importorskip("tokenizers.pre_tokenizers", reason="tokenizers is not installed")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # every byte valid UTF-8 can hold: ASCII, 2-byte lead and continuation bytes, 3- and 4-byte leads
    text = "".join(map(chr, range(1, 0x800))) + "".join(chr(0x1000 * k + 0x41) for k in range(1, 16)) + "😀\U00100000"
    table = byte_to_unicode()
    assert byte_level_string(text.encode(), table) == byte_level.pre_tokenize_str(text)[0][0]
    assert len(set(table.values())) == 256 and set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())


def test_tricky_text_gets_our_ids():
    pytest.importorskip("tokenizers", reason="tokenizers is not installed")
    _, tokenizer = course_model("ci")
    fast = export.hf_tokenizer(tokenizer)
    for text in ["", " ", "  don't  STOP—it's 2024!\n\n\t", "naïve café 🤖 1234567 \r\n x", "\u00a0\u3000日本語"]:
        assert fast.encode(text).ids == tokenizer.encode(text), repr(text)
        assert fast.decode(fast.encode(text).ids) == text


def test_a_char_tokenizer_is_refused_naming_it(tmp_path):
    tokenizer = CharTokenizer().train("abc")
    with pytest.raises(CourseError, match="tokenizer='char'"):
        export_hf(random_gpt(), tmp_path / "hf", tokenizer)
    assert list(tmp_path.iterdir()) == []
