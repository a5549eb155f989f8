import pytest
import torch
from torch import nn

from autoflip_strategy.structure import (
    UnsupportedModelError,
    discover_structure,
    structure_from_json,
    structure_to_json,
    trace_structure,
)
from models_under_test import cnn, lstm, resnet


def members(structure, group):
    return {(m.tensor, m.dim, m.chunks, m.block, m.fan_in) for m in structure.group(group).members}


def test_cnn_units_follow_flatten_into_linear():
    model, x = cnn()
    s = discover_structure(model, x)
    assert [g.name for g in s.groups] == ["conv1", "conv2", "fc1"]  # fc2 outputs are never removed
    assert members(s, "conv1") == {("conv1.weight", 0, 1, 1, True), ("conv1.bias", 0, 1, 1, False),
                                   ("conv2.weight", 1, 1, 1, False)}
    # conv2 on an 8x8 input is pooled to 2x2: each filter owns 4 consecutive fc1 inputs
    assert ("fc1.weight", 1, 1, 4, False) in members(s, "conv2")
    assert s.prunable == ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight")


def test_resnet_residual_channels_and_batchnorm_are_coupled():
    model, x = resnet()
    s = discover_structure(model, x)
    stem = {m[0] for m in members(s, "conv1")}
    # the stem's channels are added to block 0's output: both convs and all their BNs go together
    assert {"conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
            "layers.0.conv2.weight", "layers.0.bn2.weight", "layers.1.shortcut.0.weight",
            "layers.1.conv1.weight"} <= stem
    inner = members(s, "layers.0.conv1")
    assert ("layers.0.conv2.weight", 1, 1, 1, False) in inner
    assert ("layers.0.bn1.running_var", 0, 1, 1, False) in inner
    assert "fc" not in [g.name for g in s.groups]


def test_lstm_hidden_units_span_four_gates_and_consumers():
    model, x = lstm()
    s = discover_structure(model, x)
    assert [g.name for g in s.groups] == ["lstm1", "lstm2"]
    assert members(s, "lstm1") == {
        ("lstm1.weight_ih_l0", 0, 4, 1, True), ("lstm1.weight_hh_l0", 0, 4, 1, True),
        ("lstm1.weight_hh_l0", 1, 1, 1, False), ("lstm1.bias_ih_l0", 0, 4, 1, False),
        ("lstm1.bias_hh_l0", 0, 4, 1, False), ("lstm2.weight_ih_l0", 1, 1, 1, False)}
    assert ("fc.weight", 1, 1, 1, False) in members(s, "lstm2")
    assert "embedding.weight" not in s.prunable


def test_unit_entries_cover_gates_and_blocks():
    model, x = lstm()
    g = discover_structure(model, x).group("lstm1")
    gate_member = next(m for m in g.members if m.chunks == 4)
    assert g.entries(gate_member, torch.tensor([1])).tolist() == [1, 33, 65, 97]
    model, x = cnn()
    g = discover_structure(model, x).group("conv2")
    flat = next(m for m in g.members if m.block == 4)
    assert g.entries(flat, torch.tensor([2])).tolist() == [8, 9, 10, 11]


def test_json_round_trip_and_rejects_inconsistent_structure():
    model, x = resnet()
    s = discover_structure(model, x)
    assert structure_from_json(structure_to_json(s)) == s
    bad = structure_to_json(s).replace('"layers.0.conv1",16', '"layers.0.conv1",15')
    with pytest.raises(ValueError, match="malformed"):
        structure_from_json(bad)
    with pytest.raises(ValueError, match="malformed"):
        structure_from_json("{not json")


def test_depthwise_convolution_is_coupled_to_its_expand_conv():
    class Depthwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3)
            self.dw = nn.Conv2d(8, 8, 3, groups=8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.dw(self.a(x)).mean((2, 3)))

    s, left_out = trace_structure(Depthwise(), torch.randn(2, 3, 9, 9))
    # channel c of a depthwise conv is its filter c: removing a's filter c removes it, and head's input c
    assert members(s, "a") == {("a.weight", 0, 1, 1, True), ("a.bias", 0, 1, 1, False),
                               ("dw.weight", 0, 1, 1, True), ("dw.bias", 0, 1, 1, False),
                               ("head.weight", 1, 1, 1, False)}
    assert left_out == {}


def test_grouped_convolution_units_are_left_intact_with_a_reason():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3)
            self.g = nn.Conv2d(8, 8, 3, groups=2)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.g(self.a(x)).mean((2, 3)))

    s, left_out = trace_structure(Grouped(), torch.randn(2, 3, 9, 9))
    # a's filters are coupled to a grouped conv we cannot slice: that group is left out, not mangled
    assert all("g." not in m.tensor for g in s.groups for m in g.members)
    assert "a" not in [g.name for g in s.groups]
    assert "grouped convolution 'g'" in left_out["a"]


def test_cross_channel_norms_without_parameters_are_not_pass_through():
    class Normed(nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.a, self.norm, self.head = nn.Linear(4, 8), norm, nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.norm(self.a(x)))

    for norm in (nn.LayerNorm(8, elementwise_affine=False), nn.GroupNorm(2, 8, affine=False)):
        s, left_out = trace_structure(Normed(norm), torch.randn(2, 4))
        assert s.groups == () and "normalises across units" in left_out["a"], norm


def test_gru_hidden_units_span_three_gates():
    class GRUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.gru, self.out = nn.Linear(4, 6), nn.GRU(6, 5, batch_first=True), nn.Linear(5, 2)

        def forward(self, x):
            return self.out(self.gru(self.inp(x))[0][:, -1])

    s, left_out = trace_structure(GRUNet(), torch.randn(2, 7, 4))
    assert [g.name for g in s.groups] == ["gru", "inp"] and left_out == {}
    assert members(s, "gru") == {
        ("gru.weight_ih_l0", 0, 3, 1, True), ("gru.weight_hh_l0", 0, 3, 1, True),
        ("gru.weight_hh_l0", 1, 1, 1, False), ("gru.bias_ih_l0", 0, 3, 1, False),
        ("gru.bias_hh_l0", 0, 3, 1, False), ("out.weight", 1, 1, 1, False)}
    assert ("gru.weight_ih_l0", 1, 1, 1, False) in members(s, "inp")


def test_tied_weights_are_one_tensor_and_never_narrowed():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid, self.dec = nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 10)
            self.dec.weight = self.emb.weight

        def forward(self, x):
            return self.dec(torch.tanh(self.mid(self.emb(x))))

    s, left_out = trace_structure(Tied(), torch.randint(0, 10, (2, 3)))
    assert s.aliases == {"dec.weight": "emb.weight"}
    assert "dec.weight" not in s.shapes and "emb.weight" in s.prunable  # pruned once, under its first name
    assert s.groups == () and "tied" in left_out["mid"]
    assert structure_from_json(structure_to_json(s)) == s


def test_stacked_lstm_is_rejected_with_a_clear_message():
    with pytest.raises(UnsupportedModelError, match="single-layer"):
        from autoflip_strategy.structure import _layer_members

        _layer_members("rnn", nn.LSTM(4, 8, num_layers=2), True, 1)


def test_json_with_an_impossible_dimension_is_rejected():
    model, x = cnn()
    text = structure_to_json(discover_structure(model, x)).replace('["conv2.weight",1,', '["conv2.weight",7,')
    with pytest.raises(ValueError, match="malformed"):
        structure_from_json(text)
