"""openllm_edu.prune (chapter 13b): magnitude masks against a slow sort, per-layer against global ranking, the 2:4 mask
against a loop over every group of four, the mask through optimizer steps, make_permanent, and the course model's
held-out bits per byte with nothing pruned."""
import copy

import pytest
import torch
from torch import nn

from openllm_edu.core import CourseError, get_profile
from openllm_edu.finetune import held_out_bits_per_byte
from openllm_edu.model import GPT, GPTConfig, course_model
from openllm_edu.prune import (
    apply_two_four,
    effective_weight,
    follows_two_four,
    magnitude_prune,
    make_permanent,
    prune_target_names,
    pruned_layers,
    pruning_cost,
    semi_structured_supported,
    sparsity_report,
    to_semi_structured,
    two_four_mask,
)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", vocab_size=256, block_size=32)).eval()


def weights(model: nn.Module, targets="all") -> dict[str, torch.Tensor]:
    return {name: model.get_submodule(name).weight.detach().clone() for name in prune_target_names(model, targets)}


def smallest_by_sort(values: list[float], k: int) -> set[int]:
    "Indices of the k smallest values: the slow, obvious way."
    return {index for _, index in sorted((v, i) for i, v in enumerate(values))[:k]}


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.9])
def test_per_layer_pruning_masks_exactly_each_layers_smallest_weights(amount):
    model = tiny_gpt()
    before = weights(model)
    magnitude_prune(model, amount, scope="layer")
    assert sorted(pruned_layers(model)) == sorted(before)
    for name, weight in before.items():
        magnitudes = weight.abs().flatten().tolist()
        expected = smallest_by_sort(magnitudes, round(amount * len(magnitudes)))
        masked = set(torch.nonzero(model.get_submodule(name).weight_mask.flatten() == 0).flatten().tolist())
        assert masked == expected, name
        assert torch.equal(model.get_submodule(name).weight_orig, weight), "the original weight is kept beside the mask"


def test_global_pruning_ranks_the_layers_together():
    model = tiny_gpt()
    before = weights(model, "mlp")
    magnitude_prune(model, 0.6, targets="mlp", scope="global")
    everything = [(name, i, v) for name, w in before.items() for i, v in enumerate(w.abs().flatten().tolist())]
    ranked = sorted(everything, key=lambda item: item[2])[:round(0.6 * len(everything))]
    for name in before:
        expected = {i for owner, i, _ in ranked if owner == name}
        masked = set(torch.nonzero(model.get_submodule(name).weight_mask.flatten() == 0).flatten().tolist())
        assert masked == expected, name
    assert not any(name.endswith("attn.c_attn") for name in pruned_layers(model)), "only the picked layers"


def test_global_takes_from_the_small_layer_and_per_layer_from_each():
    def two_layers() -> nn.Sequential:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        with torch.no_grad():
            model[1].weight.mul_(100)  # every weight of layer 1 outweighs every weight of layer 0
        return model

    global_ = sparsity_report(magnitude_prune(two_layers(), 0.5, targets=["*"], scope="global"), targets=["*"])
    per_layer = sparsity_report(magnitude_prune(two_layers(), 0.5, targets=["*"], scope="layer"), targets=["*"])
    assert global_ == {"0": 1.0, "1": 0.0, "overall": 0.5}
    assert per_layer == {"0": 0.5, "1": 0.5, "overall": 0.5}


def test_sparsity_report_counts_zeros_by_hand():
    model = tiny_gpt()
    layer = model.blocks[1].mlp.c_fc
    with torch.no_grad():
        layer.weight[:, :10] = 0
    report = sparsity_report(model, targets=["blocks.1.mlp.c_fc", "blocks.1.mlp.c_proj"])
    c_proj_zeros = int((model.blocks[1].mlp.c_proj.weight == 0).sum())
    assert report["blocks.1.mlp.c_fc"] == 10 * 512 / (512 * 128)
    assert report["overall"] == (10 * 512 + c_proj_zeros) / (2 * 512 * 128)


def two_four_by_loop(weight: torch.Tensor) -> torch.Tensor:
    "The 2:4 mask built one group at a time: sort each group of four by |w| and keep the first two."
    mask = torch.zeros(weight.shape, dtype=torch.bool)
    for row in range(weight.shape[0]):
        for start in range(0, weight.shape[1], 4):
            group = [(-abs(weight[row, col].item()), col) for col in range(start, start + 4)]
            for _, col in sorted(group)[:2]:
                mask[row, col] = True
    return mask


def test_two_four_mask_keeps_the_two_largest_of_every_four():
    torch.manual_seed(0)
    weight = torch.randn(12, 32)
    mask = two_four_mask(weight)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert (mask.reshape(12, 8, 4).sum(-1) == 2).all()
    assert torch.equal(mask, two_four_by_loop(weight))
    assert follows_two_four(weight * mask) and not follows_two_four(weight)


def test_follows_two_four_finds_one_group_with_three():
    weight = torch.zeros(2, 8)
    weight[1, 4:7] = 1.0
    assert not follows_two_four(weight)
    weight[1, 6] = 0.0
    assert follows_two_four(weight)


def random_batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 256, (4, 33), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def test_the_two_four_mask_survives_optimizer_steps():
    model = apply_two_four(tiny_gpt())
    masks = {name: layer.weight_mask.bool().clone() for name, layer in pruned_layers(model).items()}
    kept_before = {name: effective_weight(layer).detach().clone() for name, layer in pruned_layers(model).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batches = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(3):
        _, loss = model(*random_batch(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model(*random_batch(batches))  # the pre-hook recomputes .weight from the stepped weight_orig
    for name, layer in pruned_layers(model).items():
        assert torch.equal(layer.weight_mask.bool(), masks[name]), "the mask itself does not train"
        assert (layer.weight[~masks[name]] == 0).all() and follows_two_four(layer.weight), name
        assert not torch.equal(layer.weight[masks[name]], kept_before[name][masks[name]]), "the kept weights trained"


def test_make_permanent_removes_the_reparametrisation_and_keeps_the_zeros():
    model = magnitude_prune(tiny_gpt(), 0.4, scope="global")
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = model(idx)[0]
    masked = {name: layer.weight.detach().clone() for name, layer in pruned_layers(model).items()}
    make_permanent(model)
    assert not pruned_layers(model)
    assert set(model.state_dict()) == set(tiny_gpt().state_dict()), "no weight_orig or weight_mask left"
    for name, weight in masked.items():
        layer = model.get_submodule(name)
        assert isinstance(layer.weight, nn.Parameter) and not layer._forward_pre_hooks
        assert torch.equal(layer.weight, weight)
    assert abs(sparsity_report(model)["overall"] - 0.4) < 1e-4
    with torch.no_grad():
        assert torch.equal(model(idx)[0], expected)
    assert make_permanent(model) is model, "a second call finds nothing to remove"


def test_nothing_pruned_leaves_the_course_models_bits_per_byte_unchanged():
    profile = get_profile("ci")
    model, tokenizer = course_model(profile)
    state = copy.deepcopy(model.state_dict())
    dense = held_out_bits_per_byte(model, tokenizer, profile, max_chars=3_000)
    for scope in ("layer", "global"):
        costs = pruning_cost(model, tokenizer, profile, amounts=(0.0, 0.9), scope=scope, max_chars=3_000)
        assert costs["0%"] == dense
        assert costs["90%"] != dense and costs["2:4"] != dense, "pruning for real changes the score"
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), "the model itself is untouched"


def refusal(call) -> str:
    with pytest.raises(CourseError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and len(message) < 300, message
    return message


@pytest.mark.parametrize("amount", [-0.1, 1, 1.5, "half", True, float("nan")])
def test_an_amount_outside_zero_to_one_is_refused(amount):
    assert "[0, 1)" in refusal(lambda: magnitude_prune(tiny_gpt(), amount))


def test_bad_targets_scopes_and_shapes_are_refused_with_what_to_do():
    assert "matches no nn.Linear" in refusal(lambda: magnitude_prune(tiny_gpt(), 0.5, targets=["attn.q_proj"]))
    assert "attn.c_attn" in refusal(lambda: apply_two_four(tiny_gpt(), targets=["mlp.fc"])), "lists the names there are"
    assert "tied" in refusal(lambda: magnitude_prune(tiny_gpt(), 0.5, targets=["lm_head"]))
    assert "unknown target preset" in refusal(lambda: magnitude_prune(tiny_gpt(), 0.5, targets="everything"))
    assert "scope" in refusal(lambda: magnitude_prune(tiny_gpt(), 0.5, scope="row"))
    assert "make_permanent" in refusal(lambda: apply_two_four(magnitude_prune(tiny_gpt(), 0.5)))
    odd = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 6), nn.Linear(6, 4))
    assert "divisible by 4" in refusal(lambda: apply_two_four(odd, targets=["*"]))
    assert not pruned_layers(odd), "no layer is half-pruned when one of them cannot be"


@pytest.mark.skipif(semi_structured_supported(), reason="this machine has sparse tensor cores")
def test_semi_structured_tensors_are_refused_without_sparse_tensor_cores():
    layer = make_permanent(apply_two_four(nn.Sequential(nn.Linear(64, 64)), targets=["*"]))[0]
    assert "compute capability 8.0" in refusal(lambda: to_semi_structured(layer))
