"""Model zoo: the models users bring, through the intake and a 2-round federation on the public API.

For every model of ``tests/model_zoo.py`` (torchvision ResNet-18 and MobileNetV3-small, a Transformer
encoder, a GRU text classifier, a Conv1d+BatchNorm1d audio net, a language model with tied weights, a
CNN with parameter-free GroupNorm, Flower's quickstart CNN with its fixed ``view``):

* the intake removes units only where the smaller model computes exactly what the masked model
  computes, and names every group it demotes with the reason;
* for a fresh random mask, the compact model equals the masked dense model (eval mode);
* a real 2-round federation (``AutoFLIP`` + ``AutoFLIPClient``, messages serialised to Flower's protobuf
  and back) completes with every reply accepted, pruned coordinates zero in every client's trained model
  and in the global model, tied weights still one tensor on the clients, and uplink bytes equal to the
  kept values plus array headers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from torch import nn

from autoflip_strategy import AutoFLIP, AutoFLIPClient, AutoFLIPConfig, TrainOutcome, TrainTask, UnsupportedModelError
from autoflip_strategy.compact import compact_model
from autoflip_strategy.intake import intake_model, masked_copy, random_unit_mask
from autoflip_strategy.geometry import kept_entries
from former_defaults import FORMER_DEFAULTS
from model_zoo import ZOO
from runner.inprocess import InProcessGrid

# what the intake must decide for each model: groups removed structurally, groups demoted (reason substring)
EXPECTED = {
    "resnet18": ({"conv1", "layer1.0.conv1", "layer4.1.conv1"}, {}),
    "mobilenet_v3_small": ({"features.0.0", "features.4.block.0.0", "features.9.block.0.0"}, {}),
    "transformer": ({"encoder.layers.0.linear1", "encoder.layers.1.linear1"}, {"LayerNorm"}),
    "gru_text": ({"proj", "gru", "fc1"}, set()),
    "audio_conv1d": ({"conv1", "conv2", "conv3"}, set()),
    "tied_lm": ({"lstm"}, {"tied"}),
    "groupnorm_cnn": (set(), {"GroupNorm"}),
    "quickstart_cnn": ({"conv1", "fc1", "fc2"}, {"cannot run its forward"}),
}
EXAMPLES_PER_CLIENT = 8
HEADER_BYTES = 200  # upper bound of one Flower Array's np.save header


def _build(name: str) -> tuple[nn.Module, torch.Tensor, int]:
    torch.manual_seed(0)
    return ZOO[name]()


@pytest.fixture(scope="module", params=list(ZOO))
def zoo(request):
    name = request.param
    model, x, classes = _build(name)
    return name, model, x, classes, intake_model(model, x)


def test_intake_removes_units_only_where_exact_and_names_the_rest(zoo):
    name, model, _, _, intake = zoo
    structured, demoted_reasons = EXPECTED[name]
    report = intake.report
    assert structured <= set(report.structured), (name, sorted(report.structured))
    for why in demoted_reasons:
        assert any(why in reason for reason in report.demoted.values()), (name, report.demoted)
    if not demoted_reasons:
        assert report.demoted == {}, (name, report.demoted)
    assert set(report.structured).isdisjoint(report.demoted)
    lines = report.lines()
    assert all(any(g in line for line in lines) for g in report.demoted)  # every demotion is said
    assert 0.5 < report.prunable_param_share <= 1.0 and report.prunable_flop_share is not None


def test_strict_intake_refuses_what_it_would_demote(zoo):
    name, model, x, _, intake = zoo
    if intake.report.demoted:
        with pytest.raises(UnsupportedModelError, match="cannot be removed exactly"):
            intake_model(model, x, strict=True)


def test_compact_model_equals_the_masked_model(zoo):
    name, model, x, _, intake = zoo
    s = intake.structure
    mask = random_unit_mask(s, torch.Generator().manual_seed(123))
    masked = masked_copy(model, s, mask).eval()
    compact = compact_model(masked, kept_entries(s, mask.units)).eval()
    if s.groups:
        assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in masked.parameters())
    with torch.no_grad():
        diff = (compact(x) - masked(x)).abs().max().item()
    assert diff <= 1e-5, (name, diff)


def _data(x: torch.Tensor, classes: int, partition: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + partition)
    shape = (EXAMPLES_PER_CLIENT, *x.shape[1:])
    inputs = torch.randint(0, int(x.max()) + 1, shape, generator=gen) if not x.is_floating_point() \
        else torch.randn(shape, generator=gen)
    return inputs, torch.randint(0, classes, (EXAMPLES_PER_CLIENT,), generator=gen)


def test_two_round_federation_prunes_keeps_ties_and_sends_the_kept_share(zoo):
    name, model, x, classes, _ = zoo
    strategy = AutoFLIP(model, x, AutoFLIPConfig(**{**FORMER_DEFAULTS, "sparsity": 0.5, "structured_sparsity": 0.25,
                                                    "explore_epochs": 1, "fraction_train": 1.0,
                                                    "min_available_nodes": 2, "seed": 0}),
                        train_config={"local-epochs": 1})
    checks: list[str] = []

    def train_fn(local: nn.Module, task: TrainTask) -> TrainOutcome:
        inputs, labels = _data(x, classes, int(task.context.node_config["partition-id"]))
        optimizer = torch.optim.Adam(local.parameters(), lr=1e-2, weight_decay=1e-3)
        local.train()
        for i in range(0, len(inputs), 4):
            optimizer.zero_grad()
            loss = F.cross_entropy(local(inputs[i:i + 4]), labels[i:i + 4])
            loss.backward()
            optimizer.step()
        params = dict(local.named_parameters(remove_duplicate=False))
        for alias, canonical in strategy.structure.aliases.items():
            checks.append("tied" if params[alias] is params[canonical] else f"tie broken: {alias}")
        if task.phase == "train":  # in process, the server's layout is the one this client trains under
            for n, keep in strategy.layout.compact_masks.items():
                if torch.count_nonzero(params[n].detach()[~keep]):
                    checks.append(f"{n}: pruned coordinates moved")
        return TrainOutcome(len(inputs), loss.item())

    app = AutoFLIPClient(lambda context: _build(name)[0], train_fn).build_app()
    grid = InProcessGrid(app, 2, wire=True)
    result = strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=2)

    rounds = strategy.history
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        assert len(r["replied"]) == 2 and not r["rejected"] and not r["dropped"], (name, r)
    assert not [c for c in checks if c != "tied"], checks
    assert ("tied" in checks) == bool(strategy.structure.aliases)
    assert math.isclose(rounds[-1]["density"], 0.5, abs_tol=0.02)
    final = result.arrays.to_torch_state_dict()
    for n, keep in strategy.layout.tensor_masks.items():
        assert torch.count_nonzero(final[n][~keep]) == 0, n
    n_arrays = len(strategy.structure.shapes)
    for r in rounds[1:]:
        assert r["analytic_bytes_up"] == 2 * strategy.layout.analytic_bytes(False)
        assert r["analytic_bytes_up"] <= r["bytes_up"] <= r["analytic_bytes_up"] + 2 * n_arrays * HEADER_BYTES
