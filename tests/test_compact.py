import pytest
import torch

from autoflip_strategy.codec import Layout
from autoflip_strategy.compact import compact_model
from autoflip_strategy.masks import apply_mask, compute_hybrid_mask, tensor_masks
from autoflip_strategy.structure import discover_structure
from models_under_test import ALL


@pytest.mark.parametrize("name", list(ALL))
def test_compact_model_computes_what_the_masked_dense_model_computes(name):
    torch.manual_seed(0)
    model, x = ALL[name]()
    s = discover_structure(model, x)
    mask = compute_hybrid_mask({n: torch.rand(s.shapes[n]) for n in s.prunable}, s, 0.6, 0.3)
    state = model.state_dict()
    full_masks = tensor_masks(mask, s)
    apply_mask(state, full_masks)
    model.load_state_dict(state)
    layout = Layout.build(s, mask)
    small = compact_model(model, layout.kept)
    # removed units are zero in all their coupled tensors (weights, biases, BN, consumer slices)
    for tensor, m in full_masks.items():
        assert torch.count_nonzero(state[tensor][~m]) == 0
    assert sum(p.numel() for p in small.parameters()) < 0.75 * sum(p.numel() for p in model.parameters())
    compact_state = {n: t for n, t in small.state_dict().items() if n in s.shapes}
    back = layout.to_global(compact_state)
    for n in s.shapes:
        assert torch.equal(back[n], state[n].float()), n
    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(small, mode)()
        assert torch.allclose(model(x), small(x), atol=1e-5)


def test_compact_layers_really_are_narrower():
    model, x = ALL["cnn"]()
    s = discover_structure(model, x)
    keep = {"conv1": torch.arange(32) % 2 == 0, "conv2": torch.arange(64) < 16, "fc1": torch.arange(512) < 100}
    mask = compute_hybrid_mask({n: torch.ones(s.shapes[n]) for n in s.prunable}, s, 0.0, 0.0)
    mask = type(mask)(keep, mask.weights)
    small = compact_model(model, Layout.build(s, mask).kept)
    assert small.conv1.out_channels == 16 and small.conv2.in_channels == 16 and small.conv2.out_channels == 16
    assert small.fc1.in_features == 16 * 4 and small.fc1.out_features == 100 and small.fc2.in_features == 100
    assert small(x).shape == (4, 10)
    lstm, xl = ALL["lstm"]()
    sl = discover_structure(lstm, xl)
    m = compute_hybrid_mask({n: torch.rand(sl.shapes[n]) for n in sl.prunable}, sl, 0.5, 0.5)
    small_lstm = compact_model(lstm, Layout.build(sl, m).kept)
    assert small_lstm.lstm1.hidden_size == 16 and small_lstm.lstm2.input_size == 16 and small_lstm.fc.in_features == 16
