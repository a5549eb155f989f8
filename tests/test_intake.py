"""The intake on forwards that tracing cannot judge: it removes units only where that is exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoflip_strategy import UnsupportedModelError, intake_model
from autoflip_strategy.compact import compact_model
from autoflip_strategy.intake import compact_mismatch, masked_copy, random_unit_mask
from autoflip_strategy.geometry import kept_entries
from models_under_test import ALL


class ChannelMean(nn.Module):
    """Subtracts the mean over channels in the forward: parameter-free, invisible to the graph's types."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = h - h.mean(1, keepdim=True)
        return self.head(F.relu(self.b(h)).mean((2, 3)))


class Branches(nn.Module):
    """Two conv branches, pooled to different sizes, flattened and concatenated into one Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 6, 3), nn.Conv2d(3, 4, 3), nn.Linear(6 * 4 + 4 * 1, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        pa = F.adaptive_avg_pool2d(self.a(x), 2).flatten(1)
        pb = F.adaptive_avg_pool2d(self.b(x), 1).flatten(1)
        return self.out(F.relu(self.fc(torch.cat([pa, pb], 1))))


def _exact(model, x, structure, seed=7):
    mask = random_unit_mask(structure, torch.Generator().manual_seed(seed))
    masked = masked_copy(model, structure, mask).eval()
    compact = compact_model(masked, kept_entries(structure, mask.units)).eval()
    with torch.no_grad():
        return (compact(x) - masked(x)).abs().max().item()


def test_a_mean_over_channels_demotes_the_units_feeding_it():
    torch.manual_seed(0)
    model, x = ChannelMean(), torch.randn(2, 3, 9, 9)
    intake = intake_model(model, x)
    assert "a" in intake.report.demoted and "computes something else" in intake.report.demoted["a"]
    assert "b" in intake.report.structured  # b feeds only the pooled head: exact
    assert _exact(model, x, intake.structure) <= 1e-5
    with pytest.raises(UnsupportedModelError, match="'a'"):
        intake_model(model, x, strict=True)


def test_concatenated_branches_never_yield_a_corrupt_group():
    torch.manual_seed(0)
    model, x = Branches(), torch.randn(2, 3, 8, 8)
    intake = intake_model(model, x)
    s = intake.structure
    for g in s.groups:  # every surviving group splits its tensors exactly
        for m in g.members:
            assert s.shapes[m.tensor][m.dim] == m.chunks * g.size * m.block, (g.name, m)
    named = set(intake.report.structured) | set(intake.report.demoted) | {
        layer for why in intake.report.demoted.values() for layer in ("a", "b") if f"'{layer}'" in why}
    assert {"a", "b"} <= named  # removed exactly, or left whole with a reason that names the layer
    assert _exact(model, x, s) <= 1e-5


@pytest.mark.parametrize("name", list(ALL))
def test_reference_models_pass_the_check_untouched(name):
    model, x = ALL[name]()
    intake = intake_model(model, x)
    assert intake.report.demoted == {} and intake.report.left_whole.keys() <= {"embedding"}
    assert compact_mismatch(model, x, intake.structure, torch.Generator().manual_seed(1)) is None


def test_report_is_json_ready_and_names_every_demotion():
    import json

    model, x = ChannelMean(), torch.randn(2, 3, 9, 9)
    report = intake_model(model, x).report
    data = json.loads(json.dumps(report.to_json()))
    assert set(data) == {"structured", "demoted", "left_whole", "elementwise", "tied", "prunable_param_share",
                         "prunable_flop_share"}
    assert any("'a'" in line and "stay whole" in line for line in report.lines())
