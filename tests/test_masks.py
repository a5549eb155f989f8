import pytest
import torch

from autoflip_strategy.masks import (
    apply_mask,
    compute_hybrid_mask,
    dense_mask,
    empty_output_rows,
    HybridMask,
    fixed_output_tensors,
    mask_churn,
    scheduled_sparsity,
    tensor_masks,
    unit_scores,
)
from autoflip_strategy.structure import ModelStructure, Member, UnitGroup, discover_structure
from models_under_test import ALL, cnn


def tiny_structure():
    """Two linear layers: a (4 -> 3 units), b (3 -> 2 outputs); a's units feed b's columns."""
    group = UnitGroup("a", 3, (Member("a.weight", 0, fan_in=True), Member("a.bias", 0), Member("b.weight", 1)))
    shapes = {"a.weight": (3, 4), "a.bias": (3,), "b.weight": (2, 3), "b.bias": (2,)}
    return ModelStructure((group,), ("a.weight", "b.weight"), shapes)


def test_unstructured_quantile_keeps_the_top_scores_globally():
    s = tiny_structure()
    scores = {"a.weight": torch.arange(12.0).reshape(3, 4),
              "b.weight": torch.tensor([[100.0, 0.5, 0.5], [0.5, 0.5, 0.5]])}
    mask = compute_hybrid_mask(scores, s, sparsity=0.5, structured_sparsity=0.0)
    assert mask.units["a"].all()
    assert int(mask.weights["a.weight"].sum()) + int(mask.weights["b.weight"].sum()) == 9  # 18 * 0.5
    # the 9 highest scores: 100 and a.weight values 4..11
    assert mask.weights["b.weight"].tolist() == [[True, False, False], [False, False, False]]
    assert mask.weights["a.weight"].reshape(-1).tolist() == [False] * 4 + [True] * 8
    assert mask.density() == pytest.approx(0.5)


def test_min_output_density_keeps_fan_in_for_every_classifier_row():
    """The ranking above empties b's second row (an output that no group may remove); the floor refills it."""
    s = tiny_structure()
    assert fixed_output_tensors(s) == ["b.weight"]
    scores = {"a.weight": torch.arange(12.0).reshape(3, 4),
              "b.weight": torch.tensor([[100.0, 0.5, 0.5], [0.5, 0.5, 0.5]])}
    mask = compute_hybrid_mask(scores, s, sparsity=0.5, structured_sparsity=0.0, min_output_density=0.34)
    # ceil(0.34 * 3) = 2 per row, best scores first (ties: first index)
    assert mask.weights["b.weight"].tolist() == [[True, True, False], [True, True, False]]
    assert empty_output_rows(mask.weights, s) == {}
    assert empty_output_rows(compute_hybrid_mask(scores, s, sparsity=0.5, structured_sparsity=0.0).weights, s) == {
        "b.weight": 1}
    # same budget of 9: the 5 best of a.weight fill the rest
    assert mask.weights["a.weight"].reshape(-1).tolist() == [False] * 7 + [True] * 5
    assert mask.density() == pytest.approx(0.5)


@pytest.mark.parametrize("name", list(ALL))
def test_min_output_density_changes_nothing_when_the_ranking_keeps_the_rows(name):
    model, example = ALL[name]()
    s = discover_structure(model, example)
    fixed = fixed_output_tensors(s)
    assert fixed, "every model under test has a classifier"
    gen = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(s.shapes[n], generator=gen) + (10.0 if n in fixed else 0.0) for n in s.prunable}
    plain = compute_hybrid_mask(scores, s, 0.5, 0.2)
    floored = compute_hybrid_mask(scores, s, 0.5, 0.2, min_output_density=0.5)
    assert floored.equals(plain)
    # and with the classifier ranked last, every row keeps its share of the surviving fan-in
    low = {n: t - (20.0 if n in fixed else 0.0) for n, t in scores.items()}
    mask = compute_hybrid_mask(low, s, 0.5, 0.2, min_output_density=0.25)
    assert mask.density() == pytest.approx(plain.density(), abs=1e-3)
    for n in fixed:
        rows = mask.weights[n].reshape(mask.weights[n].shape[0], -1).sum(1)
        alive = compute_hybrid_mask(low, s, 0.0, 0.2).weights[n].reshape(rows.shape[0], -1).sum(1)
        assert (rows >= torch.ceil(0.25 * alive.double() - 1e-9)).all() and (rows > 0).all(), n


def test_structured_removes_lowest_fan_in_units_and_their_consumers():
    s = tiny_structure()
    scores = {"a.weight": torch.tensor([[5.0] * 4, [0.1] * 4, [3.0] * 4]), "b.weight": torch.ones(2, 3)}
    mask = compute_hybrid_mask(scores, s, sparsity=0.3, structured_sparsity=0.34)
    assert mask.units["a"].tolist() == [True, False, True]
    assert not mask.weights["a.weight"][1].any() and not mask.weights["b.weight"][:, 1].any()
    full = tensor_masks(mask, s)
    assert full["a.bias"].tolist() == [True, False, True]
    state = {"a.weight": torch.ones(3, 4), "a.bias": torch.ones(3), "b.weight": torch.ones(2, 3),
             "b.bias": torch.ones(2)}
    apply_mask(state, full)
    assert state["a.bias"][1] == 0 and state["b.weight"][:, 1].abs().sum() == 0 and state["b.bias"].sum() == 2


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("sparsity,structured", [(0.5, 0.2), (0.8, 0.3), (0.3, 0.0)])
def test_density_hits_the_target_for_every_model(name, sparsity, structured):
    model, x = ALL[name]()
    s = discover_structure(model, x)
    torch.manual_seed(0)
    scores = {n: torch.rand(s.shapes[n]) for n in s.prunable}
    mask = compute_hybrid_mask(scores, s, sparsity, structured)
    assert mask.density() == pytest.approx(1 - sparsity, abs=1e-3)
    for g in s.groups:
        removed = g.size - int(mask.units[g.name].sum())
        assert removed == min(int(structured * g.size + 1e-9), g.size - 1)


def test_pruned_weights_stay_pruned_unless_regrowth():
    model, x = cnn()
    s = discover_structure(model, x)
    torch.manual_seed(1)
    first = compute_hybrid_mask({n: torch.rand(s.shapes[n]) for n in s.prunable}, s, 0.5, 0.2)
    other_scores = {n: torch.rand(s.shapes[n]) for n in s.prunable}
    sticky = compute_hybrid_mask(other_scores, s, 0.6, 0.25, previous=first)
    for n in s.prunable:
        assert not (sticky.weights[n] & ~first.weights[n]).any()
    for g in s.groups:
        assert not (sticky.units[g.name] & ~first.units[g.name]).any()
    regrown = compute_hybrid_mask(other_scores, s, 0.6, 0.25, previous=first, regrowth=True)
    assert any((regrown.weights[n] & ~first.weights[n]).any() for n in s.prunable)
    assert sticky.density() == pytest.approx(0.4, abs=1e-3)


def test_unit_scores_average_fan_in_rows():
    s = tiny_structure()
    scores = {"a.weight": torch.tensor([[1.0, 3.0, 1.0, 3.0], [0.0] * 4, [4.0] * 4]), "b.weight": torch.zeros(2, 3)}
    assert unit_scores(scores, s)["a"].tolist() == [2.0, 0.0, 4.0]


def test_schedule_ramps_linearly_then_holds():
    assert scheduled_sparsity(1, 0.1, 0.5, 5) == pytest.approx(0.1)
    assert scheduled_sparsity(3, 0.1, 0.5, 5) == pytest.approx(0.3)
    assert scheduled_sparsity(5, 0.1, 0.5, 5) == pytest.approx(0.5)
    assert scheduled_sparsity(9, 0.1, 0.5, 5) == pytest.approx(0.5)
    assert scheduled_sparsity(1, 0.1, 0.5, 0) == pytest.approx(0.5)


def test_dense_mask_keeps_everything():
    model, x = cnn()
    s = discover_structure(model, x)
    m = dense_mask(s)
    assert m.density() == 1.0 and all(v.all() for v in m.units.values())
    assert m.equals(dense_mask(s)) and not m.equals(None)


def test_mask_churn_counts_switches_both_ways_by_hand():
    """a.weight (3x4, 12 weights) and b.weight (2x3, 6): 18 prunable weights, 3 units in group a."""
    s = tiny_structure()
    before = dense_mask(s)
    # unit 1 removed: a.weight row 1 (4 weights) and b.weight column 1 (2 weights) go; plus a.weight[0, 0]
    units = {"a": torch.tensor([True, False, True])}
    a = torch.ones(3, 4, dtype=torch.bool)
    a[1], a[0, 0] = False, False
    b = torch.ones(2, 3, dtype=torch.bool)
    b[:, 1] = False
    after = HybridMask(units, {"a.weight": a, "b.weight": b})
    churn = mask_churn(before, after)
    assert (churn.weights, churn.units, churn.prunable) == (7, 1, 18)
    assert churn.fraction == pytest.approx(7 / 18)
    # back again: a regrown weight counts as much as a pruned one
    a2 = a.clone()
    a2[0, 0], a2[0, 1] = True, False  # one regrown, one newly pruned: 2 switches
    units2 = {"a": torch.tensor([True, True, False])}  # unit 1 back, unit 2 removed: 2 unit switches
    again = mask_churn(after, HybridMask(units2, {"a.weight": a2, "b.weight": b}))
    assert (again.weights, again.units) == (2, 2)
    same = mask_churn(after, after)
    assert (same.weights, same.units, same.fraction) == (0, 0, 0.0)


def test_mask_churn_refuses_masks_of_different_models():
    s = tiny_structure()
    mask = dense_mask(s)
    with pytest.raises(ValueError, match="differ"):
        mask_churn(mask, HybridMask(mask.units, {"a.weight": mask.weights["a.weight"]}))
    with pytest.raises(ValueError, match="b.weight"):
        mask_churn(mask, HybridMask(mask.units, {**mask.weights, "b.weight": torch.ones(3, 3, dtype=torch.bool)}))


def test_layer_quotas_by_hand():
    from autoflip_strategy.masks import layer_quotas

    counts, shapes = {"a": 100, "b": 10}, {"a": (10, 10), "b": (2, 5)}
    assert layer_quotas(counts, shapes, 55, "uniform") == {"a": 50, "b": 5}
    # ERK weights: a (10+10)/100 = 0.2, b (2+5)/10 = 0.7; eps = 55/27 gives b a share of 1.43 > 1, so b keeps
    # all 10 and a gets the remaining 45.
    assert layer_quotas(counts, shapes, 55, "erk") == {"a": 45, "b": 10}
    assert layer_quotas(counts, shapes, 200, "erk") == counts  # budget above the candidates: keep all
    assert sum(layer_quotas({"a": 7, "b": 7, "c": 7}, {k: (7,) for k in "abc"}, 10, "uniform").values()) == 10
    with pytest.raises(ValueError, match="layer budget"):
        layer_quotas(counts, shapes, 55, "nope")


@pytest.mark.parametrize("budget", ["uniform", "erk"])
def test_per_layer_budgets_keep_the_total_and_rank_within_each_tensor(budget):
    model, x = cnn()
    s = discover_structure(model, x)
    scores = {n: torch.rand(s.shapes[n]) for n in s.prunable}
    mask = compute_hybrid_mask(scores, s, 0.6, 0.0, layer_budget=budget)
    total = sum(mask.weights[n].numel() for n in s.prunable)
    kept = {n: int(mask.weights[n].sum()) for n in s.prunable}
    assert sum(kept.values()) == round(0.4 * total)
    for n in s.prunable:  # within a tensor, every kept score beats every pruned one
        keep = mask.weights[n]
        if keep.any() and (~keep).any():
            assert float(scores[n][keep].min()) >= float(scores[n][~keep].max())
    shares = [kept[n] / mask.weights[n].numel() for n in s.prunable]
    if budget == "uniform":
        assert max(shares) - min(shares) < 0.01
    else:  # ERK: the smallest tensor (fewest weights per fan-in + fan-out) is the densest
        smallest = min(s.prunable, key=lambda n: mask.weights[n].numel())
        assert kept[smallest] / mask.weights[smallest].numel() == max(shares)


def test_layer_quotas_honour_floors_and_cap_in_several_passes():
    from autoflip_strategy.masks import layer_quotas

    counts, shapes = {"a": 100, "b": 10}, {"a": (10, 10), "b": (2, 5)}
    # uniform 55 of 110 would give b 5; its floor of 8 holds, and a gets the remaining 47
    assert layer_quotas(counts, shapes, 55, "uniform", {"b": 8}) == {"a": 47, "b": 8}
    # ERK needing two capping passes (weights a 0.2, b 0.7, c 1.5; target 42): pass 1, eps = 42/30 = 1.4, caps
    # c (4.2 > 2) but not b (9.8); pass 2, eps = 40/27 = 1.48, caps b (10.4 > 10); a gets the remaining 30
    counts3, shapes3 = {"a": 100, "b": 10, "c": 2}, {"a": (10, 10), "b": (2, 5), "c": (1, 2)}
    assert layer_quotas(counts3, shapes3, 42, "erk") == {"a": 30, "b": 10, "c": 2}


@pytest.mark.parametrize("budget", ["uniform", "erk"])
def test_per_layer_budgets_with_the_row_floor_keep_the_total(budget):
    model, x = cnn()
    s = discover_structure(model, x)
    scores = {n: torch.rand(s.shapes[n]) for n in s.prunable}
    total = sum(torch.Size(s.shapes[n]).numel() for n in s.prunable)
    mask = compute_hybrid_mask(scores, s, 0.6, 0.0, min_output_density=0.9, layer_budget=budget)
    assert sum(int(mask.weights[n].sum()) for n in s.prunable) == round(0.4 * total)
    from autoflip_strategy.masks import fixed_output_tensors
    for n in fixed_output_tensors(s):  # every classifier row keeps at least 90 % of its inputs
        rows = mask.weights[n].reshape(mask.weights[n].shape[0], -1)
        assert bool((rows.sum(1) >= 0.9 * rows.shape[1] - 1e-9).all())
