"""Attention (chapter 04): every version against slow references, values and gradients, in float32."""

import pytest
import torch
import torch.nn.functional as F
from einops import repeat

from openllm_edu.attention import (
    CausalSelfAttention,
    KVCache,
    RotaryEmbedding,
    apply_rope,
    attention_cost,
    attention_loops,
    attention_naive,
    causal_attention,
    causal_mask,
    format_attention_cost,
    fused_causal_attention,
    merge_heads,
    peak_bytes_cpu,
    repeat_kv,
    rope_cache,
    sliding_window_mask,
    split_heads,
)
from openllm_edu.core import CourseError

TOL = 1e-5  # float32, values and gradients


def values_and_grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return [out.detach(), *torch.autograd.grad(out, inputs, upstream)]


def assert_same_values_and_grads(fn_a, fn_b, *inputs, atol=TOL):
    for a, b in zip(values_and_grads(fn_a, *inputs), values_and_grads(fn_b, *inputs)):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= atol


def multi_head_loops(q, k, v):
    "The slow reference on (B, H, T, d): attention_loops on every sequence and head."
    return torch.stack([torch.stack([attention_loops(q[b, h], k[b, h], v[b, h], causal=True)
                                     for h in range(q.shape[1])]) for b in range(q.shape[0])])


def window_reference(q, k, v, window):
    "Each query attends, unmasked, to the slice of its last `window` keys."
    rows = [attention_naive(q[..., i:i + 1, :], k[..., max(0, i - window + 1):i + 1, :],
                            v[..., max(0, i - window + 1):i + 1, :]) for i in range(q.shape[-2])]
    return torch.cat(rows, dim=-2)


def qkv(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


def sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("version", [causal_attention, fused_causal_attention, sdpa])
@pytest.mark.parametrize("shape", [(1, 1, 1, 4), (2, 3, 7, 8), (1, 2, 16, 5)])
def test_every_version_matches_the_loops(version, shape):
    assert_same_values_and_grads(multi_head_loops, version, *qkv(*shape))


def test_single_head_loops_match_vectorised_with_and_without_mask():
    q, k, v = qkv(6, 4)
    assert_same_values_and_grads(attention_loops, attention_naive, q, k, v)
    assert_same_values_and_grads(lambda q, k, v: attention_loops(q, k, v, causal=True), causal_attention, q, k, v)


def test_larger_inputs_sdpa_vs_naive():
    assert_same_values_and_grads(causal_attention, fused_causal_attention, *qkv(2, 4, 64, 16, seed=3))


def test_causal_mask_places_queries_at_the_end():
    assert torch.equal(causal_mask(3, 3), torch.ones(3, 3, dtype=torch.bool).tril())
    assert torch.equal(causal_mask(2, 4), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))
    q, k, v = qkv(1, 2, 9, 4)
    assert torch.allclose(fused_causal_attention(q[:, :, -3:], k, v), causal_attention(q, k, v)[:, :, -3:], atol=1e-6)
    assert torch.allclose(fused_causal_attention(q[:, :, -1:], k, v), causal_attention(q, k, v)[:, :, -1:], atol=1e-6)


@pytest.mark.parametrize("t,window", [(1, 1), (6, 1), (6, 3), (7, 7), (5, 9), (12, 4)])
def test_sliding_window_mask_matches_loops(t, window):
    expected = torch.tensor([[i - window < j <= i for j in range(t)] for i in range(t)])
    assert torch.equal(sliding_window_mask(t, window), expected)
    assert torch.equal(causal_mask(t, t, window=window), expected)


@pytest.mark.parametrize("window", [1, 2, 5, 40])
def test_windowed_attention_matches_slices(window):
    q, k, v = qkv(2, 2, 11, 8, seed=window)
    assert_same_values_and_grads(lambda q, k, v: window_reference(q, k, v, window),
                                 lambda q, k, v: fused_causal_attention(q, k, v, window=window), q, k, v)


def test_split_and_merge_heads():
    x = torch.arange(2 * 5 * 12.0).reshape(2, 5, 12)
    heads = split_heads(x, 3)
    assert heads.shape == (2, 3, 5, 4)
    assert torch.equal(heads, x.view(2, 5, 3, 4).transpose(1, 2))
    assert torch.equal(merge_heads(heads), x)


def test_repeat_kv_gives_each_group_its_head():
    x = torch.randn(2, 2, 5, 4)
    out = repeat_kv(x, 3)
    assert out.shape == (2, 6, 5, 4)
    for h in range(6):
        assert torch.equal(out[:, h], x[:, h // 3])
    assert repeat_kv(x, 1) is x


def rope_complex(x, positions, base=10000.0):
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    theta = base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angles = positions.double()[:, None] * theta
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1).float()


@pytest.mark.parametrize("base", [10000.0, 100.0])
def test_rope_is_a_rotation_of_half_pairs(base):
    x, positions = torch.randn(2, 3, 10, 8), torch.arange(5, 15)
    out = apply_rope(x, positions, base)
    assert torch.allclose(out, rope_complex(x, positions, base), atol=1e-5)
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.equal(apply_rope(x, torch.zeros(10, dtype=torch.long), base), x)


def test_rope_scores_depend_only_on_offset():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    positions = torch.arange(64)
    scores = apply_rope(q.expand(64, 16), positions) @ apply_rope(k.expand(64, 16), positions).T
    assert torch.allclose(scores[1:, 1:], scores[:-1, :-1], atol=1e-4)
    assert torch.allclose(scores.diagonal(), (q @ k).expand(64), atol=1e-4)


def test_rotary_module_matches_function_inside_and_beyond_its_table():
    rotary, x = RotaryEmbedding(8, 16), torch.randn(1, 2, 6, 8)
    for start in [0, 10, 14, 30]:
        assert torch.allclose(rotary(x, start_pos=start), apply_rope(x, torch.arange(start, start + 6)), atol=1e-6)
    cos, sin = rope_cache(8, 4)
    assert cos.shape == sin.shape == (4, 4)
    assert apply_rope(x.bfloat16(), torch.arange(6)).dtype == torch.bfloat16


def as_full_multi_head(gqa):
    n_embd, hd, g = gqa.c_proj.in_features, gqa.head_dim, gqa.n_kv_head
    full = CausalSelfAttention(n_embd, gqa.n_head, rope=gqa.rotary is not None, window=gqa.window)
    widen = lambda t: repeat(t, "(g d) ... -> (g r d) ...", r=gqa.n_head // g, d=hd)
    w_q, w_k, w_v = gqa.c_attn.weight.split([n_embd, g * hd, g * hd])
    b_q, b_k, b_v = gqa.c_attn.bias.split([n_embd, g * hd, g * hd])
    with torch.no_grad():
        full.c_attn.weight.copy_(torch.cat([w_q, widen(w_k), widen(w_v)]))
        full.c_attn.bias.copy_(torch.cat([b_q, widen(b_k), widen(b_v)]))
        full.c_proj.load_state_dict(gqa.c_proj.state_dict())
    return full


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("options", [{}, {"rope": True}, {"window": 3}])
def test_gqa_equals_multi_head_with_repeated_kv(n_kv_head, options):
    torch.manual_seed(n_kv_head)
    gqa = CausalSelfAttention(32, 4, n_kv_head=n_kv_head, **options)
    full = as_full_multi_head(gqa)
    x = torch.randn(2, 9, 32)
    (out_a, grad_a), (out_b, grad_b) = values_and_grads(gqa, x), values_and_grads(full, x)
    assert torch.allclose(out_a, out_b, atol=1e-6) and torch.allclose(grad_a, grad_b, atol=1e-6)
    assert gqa.c_attn.out_features == (4 + 2 * n_kv_head) * 8


def test_layer_equals_the_pieces_by_hand():
    torch.manual_seed(0)
    layer, x = CausalSelfAttention(24, 3), torch.randn(2, 7, 24)
    q, k, v = (split_heads(t, 3) for t in layer.c_attn(x).split(24, dim=-1))
    expected = layer.c_proj(merge_heads(multi_head_loops(q, k, v)))
    assert torch.allclose(layer(x), expected, atol=TOL)


def test_qk_norm_is_pytorchs_rms_norm_of_each_head_before_the_scores():
    torch.manual_seed(0)
    layer, x = CausalSelfAttention(24, 3, qk_norm=True, norm_eps=1e-6), torch.randn(2, 7, 24)
    with torch.no_grad():  # gains away from 1, so a forgotten gain shows
        layer.q_norm.weight.uniform_(0.5, 2.0)
        layer.k_norm.weight.uniform_(0.5, 2.0)
    q, k, v = (split_heads(t, 3) for t in layer.c_attn(x).split(24, dim=-1))
    q = F.rms_norm(q, (8,), layer.q_norm.weight, eps=1e-6)
    k = F.rms_norm(k, (8,), layer.k_norm.weight, eps=1e-6)
    expected = layer.c_proj(merge_heads(multi_head_loops(q, k, v)))
    assert torch.allclose(layer(x), expected, atol=TOL)
    assert sum(p.numel() for p in layer.parameters()) == sum(
        p.numel() for p in CausalSelfAttention(24, 3).parameters()) + 2 * 8  # a gain per head channel, q and k


def run_in_pieces(layer, x, pieces, cache):
    outputs, start = [], 0
    for size in pieces:
        outputs.append(layer(x[:, start:start + size], kv_cache=cache, start_pos=start))
        cache.advance(size)
        start += size
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("options", [{}, {"rope": True}, {"window": 4}, {"rope": True, "window": 3, "n_kv_head": 2},
                                     {"n_kv_head": 1, "rope": True}, {"qk_norm": True, "rope": True, "n_kv_head": 2}])
@pytest.mark.parametrize("pieces", [[1] * 10, [4, 1, 1, 4], [10]])
def test_kv_cache_gives_the_same_outputs(options, pieces):
    torch.manual_seed(0)
    layer, x = CausalSelfAttention(32, 4, **options).eval(), torch.randn(2, 10, 32)
    cache = KVCache(1, 2, layer.n_kv_head, 16, layer.head_dim)
    assert torch.allclose(run_in_pieces(layer, x, pieces, cache), layer(x), atol=1e-6)
    assert cache.length == 10
    cache.reset()
    assert cache.length == 0


def test_kv_cache_float64_is_exact_to_rounding():
    torch.manual_seed(0)
    layer = CausalSelfAttention(32, 4, n_kv_head=2, rope=True, window=5).double().eval()
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    cache = KVCache(1, 1, 2, 12, 8, dtype=torch.float64)
    assert (run_in_pieces(layer, x, [1] * 12, cache) - layer(x)).abs().max() < 1e-12


def test_kv_cache_layers_and_smaller_batch():
    cache = KVCache(n_layer=2, batch_size=3, n_kv_head=2, max_len=8, head_dim=4)
    k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    k_all, v_all = cache.update(1, k, v)
    assert torch.equal(k_all, k) and torch.equal(v_all, v)
    assert cache.k[0].abs().sum() == 0, "layer 0 untouched"
    cache.advance(5)
    k_all, _ = cache.update(1, k[:, :, :2], v[:, :, :2])
    assert k_all.shape == (2, 2, 7, 4)


def test_kv_cache_errors():
    layer = CausalSelfAttention(16, 2)
    with pytest.raises(CourseError, match="max_len"):
        layer(torch.randn(1, 9, 16), kv_cache=KVCache(1, 1, 2, 8, 8))
    cache = KVCache(1, 1, 2, 8, 8)
    layer(torch.randn(1, 3, 16), kv_cache=cache)
    cache.advance(3)
    with pytest.raises(CourseError, match="start_pos=0"):
        layer(torch.randn(1, 1, 16), kv_cache=cache, start_pos=0)


@pytest.mark.parametrize("kwargs,field", [
    ({"n_embd": 30, "n_head": 4}, "n_embd=30"),
    ({"n_embd": 32, "n_head": 4, "n_kv_head": 3}, "n_kv_head=3"),
    ({"n_embd": 32, "n_head": 4, "n_kv_head": 0}, "n_kv_head=0"),
    ({"n_embd": 32, "n_head": 4, "window": 0}, "window=0"),
    ({"n_embd": 32, "n_head": 4, "window": 2.5}, "window=2.5"),
    ({"n_embd": 24, "n_head": 8, "rope": True}, "even"),
])
def test_bad_sizes_name_the_field(kwargs, field):
    with pytest.raises(CourseError, match=field):
        CausalSelfAttention(**kwargs)
    with pytest.raises(CourseError):
        CausalSelfAttention(**kwargs)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer, x = CausalSelfAttention(16, 2, dropout=0.5), torch.randn(1, 6, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_peak_bytes_and_cost_table():
    assert peak_bytes_cpu(lambda: torch.ones(2**18)) == 2**20
    rows = attention_cost((16, 32), n_head=2, head_dim=8, repeats=1)
    assert [(r.version, r.seq_len) for r in rows] == [("naive", 16), ("sdpa", 16), ("naive", 32), ("sdpa", 32)]
    assert rows[-2].score_bytes == 2 * 32 * 32 * 4
    assert rows[-2].peak_bytes >= rows[-2].score_bytes
    assert "T x T scores MiB" in format_attention_cost(rows)
