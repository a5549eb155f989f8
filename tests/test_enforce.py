import pytest
import torch
import torch.nn.functional as F

from autoflip_strategy.codec import Layout
from autoflip_strategy.compact import compact_model
from autoflip_strategy.enforce import enforce_mask
from autoflip_strategy.masks import compute_hybrid_mask
from autoflip_strategy.structure import discover_structure
from models_under_test import ALL

OPTIMIZERS = {
    "adam+l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "sgd+momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
}


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("name", ["cnn", "lstm"])
def test_pruned_weights_stay_exactly_zero_while_training(name, opt):
    torch.manual_seed(0)
    model, x = ALL[name]()
    s = discover_structure(model, x)
    mask = compute_hybrid_mask({n: torch.rand(s.shapes[n]) for n in s.prunable}, s, 0.7, 0.25)
    layout = Layout.build(s, mask)
    small = compact_model(model, layout.kept)
    optimizer = OPTIMIZERS[opt](small.parameters())
    y = torch.randint(0, 10, (x.shape[0],))
    with enforce_mask(small, layout.compact_masks):
        for _ in range(5):
            optimizer.zero_grad()
            F.cross_entropy(small(x), y).backward()
            optimizer.step()
            # optimizer state can never revive a pruned weight
            for n, m in layout.compact_masks.items():
                state = optimizer.state[small.get_parameter(n)]
                for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                    if key in state:
                        assert torch.count_nonzero(state[key][~m]) == 0, (n, key)
    for n, m in layout.compact_masks.items():
        w = small.get_parameter(n)
        assert torch.count_nonzero(w[~m]) == 0
        assert torch.count_nonzero(w[m]) > 0.9 * int(m.sum())  # kept weights still train


def test_without_enforcement_weight_decay_does_revive_nothing_but_gradients_do():
    """Sanity check that the test above can fail: plain training does fill pruned weights."""
    torch.manual_seed(0)
    model, x = ALL["cnn"]()
    s = discover_structure(model, x)
    mask = compute_hybrid_mask({n: torch.rand(s.shapes[n]) for n in s.prunable}, s, 0.7, 0.0)
    with torch.no_grad():
        for n, m in mask.weights.items():
            model.get_parameter(n).mul_(m)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()
    optimizer.step()
    assert any(torch.count_nonzero(model.get_parameter(n)[~m]) > 0 for n, m in mask.weights.items())


def test_mask_names_and_shapes_are_checked():
    model, x = ALL["cnn"]()
    with pytest.raises(KeyError):
        with enforce_mask(model, {"nope.weight": torch.ones(1, dtype=torch.bool)}):
            pass
    with pytest.raises(ValueError, match="shape"):
        with enforce_mask(model, {"fc2.weight": torch.ones(3, dtype=torch.bool)}):
            pass


def test_other_models_optimizers_are_left_alone():
    """The post-step hook is process-wide; it must act only for optimizers of the wrapped model."""
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[0, 0] = False
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    with enforce_mask(a, {"weight": keep}):
        with torch.no_grad():
            a.weight[0, 0] = 5.0  # written by someone else: not ours to undo on b's step
        b(torch.randn(2, 4)).sum().backward()
        opt_b.step()
        assert a.weight[0, 0].item() == 5.0
        a(torch.randn(2, 4)).sum().backward()
        opt_a.step()
        assert a.weight[0, 0].item() == 0.0


def test_a_tied_parameter_is_masked_under_any_of_its_names():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.dec = torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False)
            self.dec.weight = self.emb.weight

        def forward(self, x):
            return self.dec(self.emb(x))

    model = Tied()
    keep = torch.rand(5, 3) < 0.5
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    with enforce_mask(model, {"dec.weight": keep}):  # the alias: named_parameters() only lists emb.weight
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(torch.tensor([0, 1, 2])), torch.tensor([1, 2, 3])).backward()
            optimizer.step()
    assert model.dec.weight is model.emb.weight
    assert torch.count_nonzero(model.emb.weight[~keep]) == 0
