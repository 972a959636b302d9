"""openllm_edu.export (chapter 14): our GPT-2-, Llama- and Mistral-shaped models, byte-level BPE and chat tokens in
Hugging Face transformers, and back.

transformers and tokenizers are the oracles: the exported folder, loaded with AutoModelForCausalLM and AutoTokenizer
and no code of ours, must give our logits (within 1e-5; exactly 0 expected in float32 where both sides run the same
kernels, a few 1e-7 where PyTorch rounds silu on a strided view differently), our greedy tokens and our ids; a
checkpoint transformers itself saved must import with its logits. Configs no stock class represents are refused
naming the field, and a failed export leaves nothing behind."""
import copy
import json

import pytest
import torch

from openllm_edu import export
from openllm_edu.core import CourseError
from openllm_edu.export import (
    byte_level_string,
    byte_to_unicode,
    export_hf,
    gpt2_config,
    gpt2_state_dict,
    hf_family,
    import_hf,
    llama_config,
    llama_state_dict,
)
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
    config = GPTConfig(**{**dict(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=64), **overrides})
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def greedy_ids(model: GPT, prompt: torch.Tensor, eos_id: int | None) -> list[int]:
    config = GenerationConfig(max_new_tokens=20, temperature=0.0, stop_at_eos=eos_id is not None)
    return generate(model, prompt, config, eos_id=eos_id)[0].tolist()


def assert_same_model(ours: GPT, folder, transformers, batch: torch.Tensor, eos_id: int | None = None,
                      architecture: str = "GPT2LMHeadModel"):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(theirs).__name__ == architecture
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


@pytest.mark.parametrize("field, value", [("norm", "rmsnorm"), ("mlp", "swiglu"), ("mlp", "relu2"), ("pos", "rope"),
                                          ("n_kv_head", 2), ("window", 8), ("qk_norm", True)])
def test_configs_gpt2_cannot_represent_are_refused_naming_the_field(field, value):
    config = GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=4, n_embd=64, **{field: value})
    with pytest.raises(CourseError, match=rf"^{field}=") as refused:
        gpt2_config(config)
    assert "\n" not in str(refused.value)
    with pytest.raises(CourseError, match=rf"^{field}="):
        gpt2_state_dict(GPT(config))


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


# --- Llama and Mistral ---------------------------------------------------------------------------------------------

LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False)
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
ROPE_MODELS = {
    "llama-gqa-odd": dict(LLAMA, n_head=6, n_embd=48, n_kv_head=2, mlp_hidden=40, rope_base=500.0, norm_eps=1e-6),
    "llama-mqa-bias-tied": dict(LLAMA, n_kv_head=1, bias=True, tie_embeddings=True, mlp_hidden=72),
    "llama-default-width": dict(LLAMA, n_kv_head=2),
    "mistral-window-5": dict(LLAMA, n_kv_head=2, window=5),
    "mistral-odd": dict(LLAMA, n_head=6, n_embd=48, n_kv_head=3, mlp_hidden=40, window=7, tie_embeddings=True),
}


@pytest.mark.parametrize("name", ROPE_MODELS)
def test_llama_and_mistral_models_load_in_transformers_with_our_logits_and_greedy_tokens(transformers, tmp_path, name):
    model = random_gpt(**ROPE_MODELS[name])
    family = hf_family(model.config)
    assert family == ("mistral" if model.config.window else "llama")
    folder = export_hf(model, tmp_path / "hf")
    batch = torch.randint(0, model.config.vocab_size, (3, model.config.block_size),
                          generator=torch.Generator().manual_seed(1))
    assert_same_model(model, folder, transformers, batch, architecture=ARCHITECTURES[family])


def test_a_swiglu_width_the_vector_units_divide_gives_exactly_our_logits(transformers, tmp_path):
    model = random_gpt(**dict(LLAMA, n_kv_head=2))  # mlp_hidden_size 256: silu on contiguous and strided rows agree
    theirs = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "hf")).eval()
    batch = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(theirs(batch).logits, model(batch)[0])


def test_llama_tensors_split_our_fused_layers_in_order():
    model = random_gpt(**ROPE_MODELS["llama-gqa-odd"])
    tensors = llama_state_dict(model)
    c_attn, c_fc = model.blocks[1].attn.c_attn.weight, model.blocks[1].mlp.c_fc.weight
    assert torch.equal(tensors["model.layers.1.self_attn.q_proj.weight"], c_attn[:48])
    assert torch.equal(tensors["model.layers.1.self_attn.k_proj.weight"], c_attn[48:64])
    assert torch.equal(tensors["model.layers.1.self_attn.v_proj.weight"], c_attn[64:])
    assert torch.equal(tensors["model.layers.1.mlp.gate_proj.weight"], c_fc[:40])
    assert torch.equal(tensors["model.layers.1.mlp.up_proj.weight"], c_fc[40:])
    assert "model.layers.0.self_attn.q_proj.bias" not in tensors


def test_our_rotation_is_transformers_rotate_half(transformers):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from openllm_edu.attention import rope_cache, rotate
    q, k = torch.randn(2, 3, 10, 16), torch.randn(2, 1, 10, 16)
    cos, sin = rope_cache(16, 10, base=500.0)
    their_q, their_k = apply_rotary_pos_emb(q, k, torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None])
    assert torch.equal(rotate(q, cos, sin), their_q) and torch.equal(rotate(k, cos, sin), their_k)


REFUSED = {  # config changes -> the field the message must start with
    "rope+layernorm": (dict(pos="rope"), "norm"),
    "rope+gelu": (dict(pos="rope", norm="rmsnorm"), "mlp"),
    "learned+rmsnorm": (dict(norm="rmsnorm"), "norm"),
    "learned+swiglu": (dict(mlp="swiglu"), "mlp"),
    "learned+gqa": (dict(n_kv_head=2), "n_kv_head"),
    "learned+window": (dict(window=8), "window"),
    "window+bias": (dict(LLAMA, window=8, bias=True), "bias"),
    "learned+relu2": (dict(mlp="relu2"), "mlp"),
    "rope+relu2": (dict(LLAMA, mlp="relu2"), "mlp"),
    "learned+qk_norm": (dict(qk_norm=True), "qk_norm"),
    "llama+qk_norm": (dict(LLAMA, qk_norm=True), "qk_norm"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_configs_no_stock_class_represents_are_refused_naming_the_field(tmp_path, name):
    changes, field = REFUSED[name]
    config = GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=4, n_embd=64, **changes)
    with pytest.raises(CourseError, match=rf"^{field}=") as refused:
        hf_family(config)
    assert "\n" not in str(refused.value)
    with pytest.raises(CourseError, match=rf"^{field}="):
        export_hf(GPT(config), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_llama_functions_refuse_learned_positions():
    config = GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=4, n_embd=64)
    with pytest.raises(CourseError, match="^pos='learned'"):
        llama_config(config)
    with pytest.raises(CourseError, match="^pos='learned'"):
        llama_state_dict(GPT(config))


def test_the_tinyllama_preset_is_llama():
    assert hf_family(GPTConfig.preset("tinyllama-1.1b")) == "llama"


# --- import_hf -----------------------------------------------------------------------------------------------------

def assert_same_tensors(a: GPT, b: GPT):
    a_tensors, b_tensors = a.state_dict(), b.state_dict()
    assert a_tensors.keys() == b_tensors.keys()
    for name in a_tensors:
        assert torch.equal(a_tensors[name], b_tensors[name]), name


ROUND_TRIPS = {"gpt2": dict(), "gpt2-no-bias-untied": dict(bias=False, tie_embeddings=False, mlp_hidden=96),
               **ROPE_MODELS}


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_import_hf_of_an_export_is_the_same_model_tensor_for_tensor(tmp_path, name):
    model = random_gpt(**ROUND_TRIPS[name])
    imported, tokenizer = import_hf(export_hf(model, tmp_path / "hf"))
    assert tokenizer is None  # none was exported
    assert imported.config == model.config
    assert_same_tensors(imported, model)
    batch = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(imported(batch)[0], model(batch)[0])
    assert not imported.training


def perturbed_in_place(model):
    torch.manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def checkpoints_transformers_saves(transformers):
    "Random models built and saved by transformers itself: an oracle independent of our export."
    tm = transformers
    yield "gpt2", tm.GPT2LMHeadModel(tm.GPT2Config(vocab_size=300, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                                   activation_function="gelu"))
    yield "llama", tm.LlamaForCausalLM(tm.LlamaConfig(
        vocab_size=300, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=32, attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="default", rope_theta=300.0)))
    yield "mistral", tm.MistralForCausalLM(tm.MistralConfig(
        vocab_size=300, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, max_position_embeddings=32, sliding_window=6, tie_word_embeddings=True))


def test_checkpoints_transformers_saved_import_with_its_logits(transformers, tmp_path):
    batch = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(5))
    for family, theirs in checkpoints_transformers_saves(transformers):
        theirs = perturbed_in_place(theirs)
        theirs.save_pretrained(tmp_path / family)
        ours, _ = import_hf(tmp_path / family)
        assert hf_family(ours.config) == family
        with torch.no_grad():
            difference = (theirs(batch).logits - ours(batch)[0]).abs().max().item()
        assert difference <= LOGIT_TOLERANCE, f"{family}: max |logit difference| {difference}"


def exported_config(tmp_path, **overrides) -> tuple:
    folder = export_hf(random_gpt(**overrides), tmp_path / "hf")
    return folder, json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("overrides, change, field", [
    (dict(), dict(activation_function="gelu_new"), "activation_function"),
    (dict(), dict(model_type="gpt_neox"), "model_type"),
    (dict(LLAMA), dict(hidden_act="gelu"), "hidden_act"),
    (dict(LLAMA), dict(rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0)), "rope_type"),
    (dict(LLAMA), dict(attention_bias=True), "mlp_bias"),
    (dict(LLAMA), dict(head_dim=32), "head_dim"),
], ids=["gelu_new", "other-architecture", "gelu-gate", "llama3-rope", "half-bias", "head-dim"])
def test_checkpoints_our_gpt_cannot_reproduce_are_refused_naming_the_field(tmp_path, overrides, change, field):
    folder, values = exported_config(tmp_path, **overrides)
    (folder / "config.json").write_text(json.dumps({**values, **change}))
    with pytest.raises(CourseError, match=rf"^{field}=") as refused:
        import_hf(folder)
    assert "\n" not in str(refused.value)


def test_missing_or_sharded_weights_are_refused_with_what_to_do(tmp_path):
    folder, _ = exported_config(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CourseError, match="no model.safetensors.*export it again"):
        import_hf(folder)
    (folder / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CourseError, match="shards"):
        import_hf(folder)
    with pytest.raises(CourseError, match="no config.json"):
        import_hf(tmp_path)


# --- tokenizers, chat template, model card -------------------------------------------------------------------------

def test_the_course_tokenizer_comes_back_from_its_export_and_a_foreign_one_does_not(tmp_path):
    pytest.importorskip("tokenizers", reason="tokenizers is not installed")
    model, tokenizer = course_model("ci")
    folder = export_hf(model, tmp_path / "hf", tokenizer)
    imported, imported_tokenizer = import_hf(folder)
    assert imported_tokenizer.fingerprint == tokenizer.fingerprint
    assert_same_tensors(imported, model)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Lowercase"}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    assert import_hf(folder)[1] is None


CONVERSATIONS = [
    [{"role": "user", "content": "Who is there?"}, {"role": "assistant", "content": "Nay, answer me."}],
    [{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "  Long live the king!\n"},
     {"role": "assistant", "content": "Bernardo?"}, {"role": "user", "content": "He. 🤖 naïve"}],
]


def test_apply_chat_template_gives_render_conversation_ids(transformers, tmp_path):
    from openllm_edu.chat import ChatTokenizer, render_conversation, render_prompt, resize_embeddings

    model, tokenizer = course_model("ci")
    chat = ChatTokenizer(tokenizer)
    chat_model = resize_embeddings(copy.deepcopy(model), chat.vocab_size)
    folder = export_hf(chat_model, tmp_path / "hf", chat)
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    for messages in CONVERSATIONS:
        assert auto.apply_chat_template(messages, tokenize=True, return_dict=False) == render_conversation(
            chat, messages)[0]
        assert auto.apply_chat_template(messages[:-1] if messages[-1]["role"] == "assistant" else messages,
                                        tokenize=True, add_generation_prompt=True, return_dict=False) == render_prompt(
            chat, messages[:-1] if messages[-1]["role"] == "assistant" else messages)
    assert auto.eos_token_id == chat.end_id and auto.pad_token_id == chat.pad_id
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == chat.end_id  # generate stops at the end of a turn, as ours does
    imported, imported_tokenizer = import_hf(folder)
    assert isinstance(imported_tokenizer, ChatTokenizer) and imported_tokenizer.fingerprint == chat.fingerprint
    assert_same_tensors(imported, chat_model)


def test_a_chat_token_that_is_already_a_bpe_token_is_refused(tmp_path):
    pytest.importorskip("tokenizers", reason="tokenizers is not installed")
    from openllm_edu.chat import ChatTokenizer, resize_embeddings

    model, tokenizer = course_model("ci")
    chat = ChatTokenizer(tokenizer, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>", "a"))  # "a": byte 97
    with pytest.raises(CourseError, match="chat token 'a'"):
        export_hf(resize_embeddings(copy.deepcopy(model), chat.vocab_size), tmp_path / "hf", chat)
    assert list(tmp_path.iterdir()) == []


def test_the_model_card_states_the_recorded_facts_and_nothing_else(tmp_path):
    from openllm_edu.model import REPORT_FILE, course_model_dir

    model, _ = course_model("ci")
    report = json.loads((course_model_dir("ci") / REPORT_FILE).read_text())
    card = (export_hf(course_model_dir("ci"), tmp_path / "course") / "README.md").read_text()
    assert f"**Parameters:** {model.num_params():,}" in card
    assert f"{report['held_out']['bits_per_byte']:.4f} bits per byte" in card
    assert "`GPT2LMHeadModel`" in card and "public domain" in card and "GPL-3.0-or-later" in card
    assert "Not for production" in card

    llama = random_gpt(**ROPE_MODELS["llama-gqa-odd"])
    bare = (export_hf(save_pretrained(llama, tmp_path / "saved"), tmp_path / "bare") / "README.md").read_text()
    assert f"{llama.num_params():,}" in bare and "`LlamaForCausalLM`" in bare and "6 / 2 / 48" in bare
    assert "Nothing about the training data" in bare and "public domain" not in bare
    assert "bits per byte" not in bare


def test_the_model_card_carries_the_finetune_table(tmp_path):
    from openllm_edu.finetune import FINETUNE_REPORT, format_finetune_report

    model = random_gpt()
    folder = save_pretrained(model, tmp_path / "tuned")
    scores = lambda match: {"chat": {"n": 20, "exact_match": match, "ended": 0.5}}  # noqa: E731
    report = dict(method="lora", data="chat", steps=7, held_out="instruction_data held-out items",
                  before=dict(exact_match=scores(0.1), bits_per_byte=3.25), after=dict(exact_match=scores(0.4),
                                                                                      bits_per_byte=3.5))
    (folder / FINETUNE_REPORT).write_text(json.dumps(report))
    card = (export_hf(folder, tmp_path / "hf") / "README.md").read_text()
    assert format_finetune_report(report) in card and "(lora)" in card and "7 steps" in card
    (folder / FINETUNE_REPORT).write_text("{not json")
    with pytest.raises(CourseError, match="finetune.json is not valid JSON"):
        export_hf(folder, tmp_path / "hf2")
    assert not (tmp_path / "hf2").exists()


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    _, tokenizer = course_model("ci")  # 512 ids
    with pytest.raises(CourseError, match="tokenizer has 512 ids"):
        export_hf(random_gpt(vocab_size=300), tmp_path / "hf", tokenizer)
    assert list(tmp_path.iterdir()) == []
