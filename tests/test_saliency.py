"""SynFlow saliency (server, data-free) and SNIP gradients (client, one batch)."""

import pytest
import torch
from torch import nn

from autoflip_strategy.masks import HybridMask, compute_hybrid_mask, remove_units
from autoflip_strategy.saliency import (density_schedule, first_gradients, flow_input, snip_scores, synflow_mask,
                                        synflow_scores)
from autoflip_strategy.structure import ModelStructure, discover_structure
from models_under_test import ALL


def two_layer() -> tuple[nn.Module, ModelStructure]:
    """x(2) -> W1 (2x2) -> ReLU -> w2 (1x2): R on ones is Σ_j |w2_j| Σ_i |W1_ji| (no biases)."""
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
        net[2].weight.copy_(torch.tensor([[-4.0, 1.0]]))
    structure = ModelStructure((), ("0.weight", "2.weight"), {"0.weight": (2, 2), "2.weight": (1, 2)})
    return net, structure


def test_synflow_scores_by_hand():
    net, s = two_layer()
    scores = synflow_scores(net, s, torch.randn(5, 2))
    # ∂R/∂|W1_ji| = |w2_j|, ∂R/∂|w2_j| = Σ_i |W1_ji|
    assert torch.equal(scores["0.weight"], torch.tensor([[4.0, 8.0], [3.0, 0.5]], dtype=torch.float64))
    assert torch.equal(scores["2.weight"], torch.tensor([[12.0, 3.5]], dtype=torch.float64))
    assert torch.equal(net[0].weight, torch.tensor([[1.0, -2.0], [3.0, 0.5]]))  # the model itself is untouched


def test_synflow_scores_see_the_mask():
    net, s = two_layer()
    mask = HybridMask({}, {"0.weight": torch.tensor([[True, False], [True, True]]),
                           "2.weight": torch.ones(1, 2, dtype=torch.bool)})
    scores = synflow_scores(net, s, torch.randn(1, 2), mask)
    assert torch.equal(scores["0.weight"], torch.tensor([[4.0, 0.0], [3.0, 0.5]], dtype=torch.float64))
    assert torch.equal(scores["2.weight"], torch.tensor([[4.0, 3.5]], dtype=torch.float64))


def test_flow_input():
    assert torch.equal(flow_input(torch.randn(7, 3, 4)), torch.ones(1, 3, 4, dtype=torch.float64))
    ids = torch.tensor([[3, 1, 2], [0, 0, 0]])
    assert torch.equal(flow_input(ids), ids[:1])


def test_density_schedule_is_exponential():
    d = density_schedule(0.9, 4)
    assert d[-1] == pytest.approx(0.1)
    ratios = [d[0]] + [b / a for a, b in zip(d, d[1:])]
    assert ratios == pytest.approx([0.1 ** 0.25] * 4)


def test_iterative_pruning_reprunes_from_the_masked_flow():
    """One step keeps the 3 highest one-shot scores (12, 8, 4); iterating re-scores after each cut."""
    net, s = two_layer()
    one_shot = synflow_mask(net, s, torch.ones(1, 2), sparsity=0.5, iterations=1)
    assert one_shot.weights["2.weight"].tolist() == [[True, False]]
    assert one_shot.weights["0.weight"].tolist() == [[True, True], [False, False]]
    iterated = synflow_mask(net, s, torch.ones(1, 2), sparsity=0.5, iterations=3)
    assert int(sum(m.sum() for m in iterated.weights.values())) == 3
    # a path survives: some kept first-layer row feeds a kept output weight
    rows = iterated.weights["0.weight"].any(1)
    assert bool((rows & iterated.weights["2.weight"][0]).any())


@pytest.mark.parametrize("name", list(ALL))
def test_synflow_mask_hits_density_and_keeps_every_layer(name):
    torch.manual_seed(0)
    model, x = ALL[name]()
    s = discover_structure(model, x)
    mask = synflow_mask(model, s, x, sparsity=0.9, structured_sparsity=0.25, iterations=10)
    kept = sum(int(m.sum()) for m in mask.weights.values())
    assert kept == round(0.1 * s.num_prunable)
    assert all(bool(m.any()) for m in mask.weights.values())  # no layer collapse at 90 %
    for g in s.groups:
        assert int((~mask.units[g.name]).sum()) == min(int(0.25 * g.size + 1e-9), g.size - 1)
    cleared = {n: m.clone() for n, m in mask.weights.items()}
    remove_units(cleared, s, mask.units)
    assert all(torch.equal(cleared[n], mask.weights[n]) for n in cleared)
    again = synflow_mask(model, s, x, sparsity=0.9, structured_sparsity=0.25, iterations=10)
    assert again.equals(mask)  # data-free and deterministic: same θ₀, same mask


def test_synflow_is_not_magnitude():
    """Scores depend on the downstream flow: a large weight feeding a dead-end unit scores zero."""
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[9.0, 9.0], [1.0, 1.0]]))
        net[1].weight.copy_(torch.tensor([[0.0, 1.0]]))
    s = ModelStructure((), ("0.weight", "1.weight"), {"0.weight": (2, 2), "1.weight": (1, 2)})
    scores = synflow_scores(net, s, torch.ones(1, 2))
    assert scores["0.weight"][0].tolist() == [0.0, 0.0] and scores["0.weight"][1].tolist() == [1.0, 1.0]
    mask = compute_hybrid_mask(scores, s, sparsity=0.5, structured_sparsity=0.0)
    assert mask.weights["0.weight"][1].all() and not mask.weights["0.weight"][0].any()


def test_first_gradients_stop_before_the_first_step():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    other = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def train():
        nn.functional.mse_loss(other(batches[0][0]), torch.zeros(4, 2)).backward()
        torch.optim.SGD(other.parameters(), lr=0.1).step()  # another model's optimizer: ignored
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for xb, yb in batches:
            seen.append(1)
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()

    grads, examples = first_gradients(model, train)
    assert examples == 4 and len(seen) == 1 and all(torch.equal(model.state_dict()[k], v) for k, v in theta0.items())
    ref = nn.Linear(3, 2)
    ref.load_state_dict(theta0)
    nn.functional.cross_entropy(ref(batches[0][0]), batches[0][1]).backward()
    assert torch.allclose(grads["weight"], ref.weight.grad) and torch.allclose(grads["bias"], ref.bias.grad)
    scores = snip_scores(theta0, grads, ["weight"])
    assert torch.allclose(scores["weight"], (ref.weight.grad * theta0["weight"]).abs())


def test_first_gradients_need_an_optimizer_step():
    model = nn.Linear(2, 1)
    with pytest.raises(RuntimeError, match="no optimizer step"):
        first_gradients(model, lambda: model(torch.ones(1, 2)).sum().backward())
