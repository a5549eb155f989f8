"""The sign supermask: any training loop trains signs, never magnitudes."""

import pytest
import torch
from torch import nn

from autoflip_strategy.codec import Layout
from autoflip_strategy.compact import compact_model
from autoflip_strategy.masks import compute_hybrid_mask
from autoflip_strategy.signs import kept_signs
from autoflip_strategy.structure import discover_structure
from autoflip_strategy.supermask import attach_supermask, detach_supermask
from model_zoo import GRUTextClassifier, TiedLM
from models_under_test import ALL


def train(model, x, steps, optimizer):
    torch.manual_seed(1)
    out_dim = None
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(x)
        out_dim = out.shape[-1]
        target = torch.randint(0, out_dim, out.shape[:-1])
        nn.functional.cross_entropy(out.reshape(-1, out_dim), target.reshape(-1)).backward()
        optimizer.step()


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_kept_magnitudes_never_change(name, opt):
    torch.manual_seed(0)
    model, x = ALL[name]()
    s = discover_structure(model, x)
    mask = compute_hybrid_mask({n: torch.rand(s.shapes[n]) for n in s.prunable}, s, 0.7, 0.25)
    layout = Layout.build(s, mask)
    compact = compact_model(model, layout.kept)
    compact.load_state_dict(layout.to_compact(model.state_dict()), strict=False)
    before = {n: t.detach().clone() for n, t in compact.state_dict().items()}
    attach_supermask(compact, layout.compact_masks)
    assert all(n not in dict(compact.named_parameters()) for n in s.prunable)  # the weights are not trained
    optimizer = (torch.optim.SGD(compact.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1) if opt == "sgd"
                 else torch.optim.Adam(compact.parameters(), lr=0.05, weight_decay=0.1))
    train(compact, x, 5, optimizer)
    bits = detach_supermask(compact)
    after = compact.state_dict()
    flipped = 0
    for n, keep in layout.compact_masks.items():
        assert torch.equal(after[n].abs()[keep], before[n].abs()[keep])
        assert not after[n][~keep].any()
        assert torch.equal(bits[n], kept_signs(after, layout)[n])
        flipped += int((bits[n] != (before[n][keep] >= 0)).sum())
    assert flipped > 0  # the signs did train
    assert any(not torch.equal(after[n], before[n]) for n in before if n not in layout.compact_masks)  # biases train
    assert set(dict(compact.named_parameters())) >= set(s.prunable)  # plain weights again


def test_straight_through_gradient_by_hand():
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-0.5, 2.0]]))
    attach_supermask(layer, {"weight": torch.tensor([[True, False]])})
    assert torch.equal(layer.weight, torch.tensor([[-0.5, 0.0]]))
    layer(torch.tensor([[3.0, 7.0]])).sum().backward()
    score = layer.parametrizations.weight.original
    # ∂y/∂w = x, passed straight through to the score where kept
    assert torch.equal(score.grad, torch.tensor([[3.0, 0.0]]))
    with torch.no_grad():
        score.copy_(torch.tensor([[0.1, -9.0]]))  # crosses zero: the sign flips, the magnitude stays
    assert torch.equal(layer.weight, torch.tensor([[0.5, 0.0]]))
    assert detach_supermask(layer)["weight"].tolist() == [True]


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_recurrent_weights_follow_the_parametrization(cls):
    torch.manual_seed(0)
    rnn = cls(3, 4, batch_first=True)
    keep = {n: torch.rand(p.shape) < 0.5 for n, p in rnn.named_parameters() if n.startswith("weight")}
    attach_supermask(rnn, keep)
    with torch.no_grad():
        rnn.parametrizations.weight_hh_l0.original.neg_()  # flip every recurrent sign
    plain = cls(3, 4, batch_first=True)
    plain.load_state_dict({k.replace("parametrizations.", "").replace(".original", ""): v
                           for k, v in rnn.state_dict().items() if "magnitude" not in k and "keep" not in k},
                          strict=False)
    with torch.no_grad():
        for n in keep:
            getattr(plain, n).copy_(getattr(rnn, n))
    x = torch.randn(2, 5, 3)
    assert torch.allclose(rnn(x)[0], plain(x)[0])
    rnn(x)[0].sum().backward()
    assert rnn.parametrizations.weight_ih_l0.original.grad.abs().sum() > 0


def test_tied_weight_stays_one_tensor():
    torch.manual_seed(0)
    lm = TiedLM()
    x = torch.randint(0, 40, (3, 6))
    theta0 = lm.embedding.weight.detach().clone()
    keep = torch.rand(theta0.shape) < 0.5
    attach_supermask(lm, {"decoder.weight": keep})
    assert lm.embedding.parametrizations.weight.original is lm.decoder.parametrizations.weight.original
    assert torch.equal(lm.embedding.weight, lm.decoder.weight)
    train(lm, x, 3, torch.optim.Adam(lm.parameters(), lr=0.05))
    bits = detach_supermask(lm)
    assert list(bits) == ["embedding.weight"]  # once, under the first name
    assert lm.decoder.weight is lm.embedding.weight
    assert torch.equal(lm.embedding.weight.abs()[keep], theta0.abs()[keep]) and not lm.embedding.weight[~keep].any()
    assert torch.equal(bits["embedding.weight"], lm.embedding.weight.detach()[keep] >= 0)


def test_gru_classifier_trains_signs_only():
    torch.manual_seed(0)
    gru = GRUTextClassifier()
    keep = {n: torch.ones_like(p, dtype=torch.bool) for n, p in gru.named_parameters()
            if n.startswith(("proj", "gru.weight", "fc")) and n.endswith(("weight", "_l0")) and p.dim() == 2}
    before = {n: gru.get_parameter(n).detach().clone() for n in keep}
    attach_supermask(gru, keep)
    train(gru, torch.randint(0, 50, (4, 7)), 5, torch.optim.SGD(gru.parameters(), lr=1.0))
    bits = detach_supermask(gru)
    assert set(bits) == set(keep)
    assert all(torch.equal(gru.get_parameter(n).abs(), before[n].abs()) for n in keep)
    assert any(not torch.equal(gru.get_parameter(n), before[n]) for n in keep)
