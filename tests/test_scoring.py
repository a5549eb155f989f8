import pytest
import torch

from autoflip_strategy import guidance as G
from autoflip_strategy.config import STRATEGY_OPTIONS, AutoFLIPConfig
from autoflip_strategy.masks import compute_hybrid_mask
from autoflip_strategy.scoring import METHODS, Method, MethodContext, build_method, round_mask
from autoflip_strategy.structure import discover_structure
from former_defaults import FORMER_DEFAULTS
from models_under_test import cnn


@pytest.fixture(scope="module")
def model_and_structure():
    model, x = cnn()
    return model, x, discover_structure(model, x)


def method(model_and_structure, **settings) -> Method:
    model, x, s = model_and_structure
    return build_method(MethodContext(AutoFLIPConfig(**{**FORMER_DEFAULTS, **settings}), s, model, x))


def state_of(model_and_structure):
    model, _, s = model_and_structure
    return {n: t.detach().float() for n, t in model.state_dict().items() if n in s.shapes}


def test_the_strategy_option_lists_every_method():
    choices = next(o.choices for o in STRATEGY_OPTIONS if o.key == "strategy")
    assert set(choices) == set(METHODS) >= {"autoflip", "fedavg", "random", "magnitude"}
    assert all(METHODS[name].name == name for name in METHODS)
    assert [AutoFLIPConfig(strategy=name).prunes for name in ("autoflip", "fedavg")] == [True, False]


def test_each_method_answers_the_strategys_questions(model_and_structure):
    flags = {name: (m.prunes, m.explores, m.fixed, m.ramps) for name, m in METHODS.items()}
    assert flags["autoflip"] == (True, True, False, True)
    assert flags["fedavg"][0] is False
    assert flags["random"] == (True, False, True, False)
    assert flags["magnitude"] == (True, False, False, True)


def test_magnitude_scores_the_current_model_and_random_draws_once(model_and_structure):
    _, _, s = model_and_structure
    state = state_of(model_and_structure)
    mag = method(model_and_structure, strategy="magnitude")
    assert all(torch.equal(mag.round_scores(None, state)[n], G.magnitude(state, s.prunable)[n]) for n in s.prunable)
    rnd = method(model_and_structure, strategy="random", seed=3)
    drawn = rnd.round_scores(None, state)
    assert all(torch.equal(drawn[n], method(model_and_structure, strategy="random", seed=3).round_scores(
        None, state)[n]) for n in s.prunable)  # seeded
    assert rnd.round_scores(drawn, state) is drawn  # drawn once, then kept


def test_guidance_starts_from_exploration_or_falls_back_to_magnitudes(model_and_structure):
    _, _, s = model_and_structure
    state = state_of(model_and_structure)
    auto = method(model_and_structure, strategy="autoflip", guidance_norm="max")
    mean = {n: torch.rand(s.shapes[n]) * 5 for n in s.prunable}
    assert all(float(t.max()) == pytest.approx(1.0) for t in auto.explored(mean, state).values())
    fallback = auto.explored(None, state)
    assert all(torch.equal(fallback[n], G.magnitude(state, s.prunable, "max")[n]) for n in s.prunable)
    with pytest.raises(ValueError, match="no scores yet"):
        auto.round_scores(None, state)
    stats = G.UpdateStatistics()
    stats.add({n: torch.ones(s.shapes[n]) for n in s.prunable}, 1.0)
    refreshed = auto.refresh(mean, stats)
    assert not torch.equal(refreshed[s.prunable[0]], mean[s.prunable[0]])
    assert method(model_and_structure, strategy="magnitude").refresh(mean, stats) is mean  # default: unchanged


def test_round_mask_ramps_only_methods_that_ramp(model_and_structure):
    _, _, s = model_and_structure
    state = state_of(model_and_structure)
    ramp = {"sparsity": 0.8, "sparsity_initial": 0.2, "sparsity_ramp_rounds": 4}
    mag = method(model_and_structure, strategy="magnitude", **ramp)
    scores, mask = round_mask(mag, None, state, None, 1)
    assert mask.density() == pytest.approx(0.8, abs=0.01)  # round 1 of the ramp: sparsity 0.2
    assert round_mask(mag, None, state, None, 4)[1].density() == pytest.approx(0.2, abs=0.01)
    direct = compute_hybrid_mask(scores, s, 0.2, 0.2 * 0.2 / 0.8)
    assert mask.equals(direct)
    rnd = method(model_and_structure, strategy="random", **ramp)
    assert round_mask(rnd, None, state, None, 1)[1].density() == pytest.approx(0.2, abs=0.01)  # no ramp


def test_guidance_score_deviation_magnitude_ranks_guidance_times_current_weights(model_and_structure):
    _, _, s = model_and_structure
    state = state_of(model_and_structure)
    guidance = {n: torch.rand(s.shapes[n]) + 0.1 for n in s.prunable}
    plain = method(model_and_structure, strategy="autoflip", guidance_norm="max")
    assert plain.ranking(guidance, state) is guidance  # the paper's deviation, unchanged
    both = method(model_and_structure, strategy="autoflip", guidance_norm="max", guidance_score="deviation-magnitude")
    assert both.round_scores(guidance, state) is guidance  # what is kept and refreshed stays the guidance
    scored = both.ranking(guidance, state)
    for n in s.prunable:
        product = guidance[n] * state[n].abs()
        assert torch.allclose(scored[n], product / product.max())  # renormalised per tensor
    name = s.prunable[0]  # by hand: a weight of zero magnitude scores zero, whatever its deviation
    zeroed = {**state, name: torch.zeros_like(state[name])}
    assert float(both.ranking(guidance, zeroed)[name].abs().max()) == 0.0
    # Through round_mask: the mask ranks the product, the returned (kept) scores are the guidance itself, so
    # no power of |θ| accumulates across rounds.
    kept, mask = round_mask(both, guidance, state, None, 1)
    assert kept is guidance
    expected = compute_hybrid_mask(scored, s, both.context.config.sparsity, both.context.config.structured_sparsity)
    assert all(torch.equal(mask.weights[n], expected.weights[n]) for n in s.prunable)
