import torch

from autoflip_strategy.costs import forward_flops_by_layer, training_flops_per_example
from autoflip_task.models import CharLSTM, PaperCNN, SmallResNet

# forward FLOPs of PaperCNN(1, 8, 10) by hand: 2 * MACs
CONV1 = 2 * 32 * 1 * 25 * 8 * 8
CONV2 = 2 * 64 * 32 * 25 * 4 * 4
FC1 = 2 * 256 * 512
FC2 = 2 * 512 * 10


def test_forward_flops_per_layer_match_the_formula():
    per_layer, total = forward_flops_by_layer(PaperCNN(1, 8, 10), torch.zeros(1, 1, 8, 8))
    assert per_layer == {"conv1": CONV1, "conv2": CONV2, "fc1": FC1, "fc2": FC2}
    assert total == CONV1 + CONV2 + FC1 + FC2


def test_training_is_forward_plus_twice_forward_except_the_input_gradient():
    flops = training_flops_per_example(PaperCNN(1, 8, 10), torch.zeros(1, 1, 8, 8))
    # backward: weight gradient for every layer, input gradient for all but the first
    assert flops == 3 * (CONV1 + CONV2 + FC1 + FC2) - CONV1


def test_lstm_layers_are_counted_by_formula():
    model = CharLSTM(30, hidden=16)
    flops = training_flops_per_example(model, torch.zeros(1, 12, dtype=torch.long))
    lstm = 2 * 4 * 16 * (8 + 16) * 12 + 2 * 4 * 16 * (16 + 16) * 12
    assert flops >= 3 * lstm and flops < 3 * lstm + 4 * 2 * 16 * 30


def test_unstructured_masks_scale_each_layer_by_its_own_density():
    model, x = PaperCNN(1, 8, 10), torch.zeros(1, 1, 8, 8)
    dense = training_flops_per_example(model, x)
    half_fc1 = torch.rand(512, 256) < 2  # all True
    half_fc1[:256] = False
    masked = training_flops_per_example(model, x, {"fc1.weight": half_fc1})
    forward = CONV1 + CONV2 + FC1 + FC2
    assert masked == round(dense * (1 - 0.5 * FC1 / forward))
    # pruning half of conv2 saves far more: its weights are used at every position
    half_conv2 = torch.ones(64, 32, 5, 5, dtype=torch.bool)
    half_conv2[:32] = False
    assert training_flops_per_example(model, x, {"conv2.weight": half_conv2}) < masked


def test_counting_does_not_touch_the_model():
    model = SmallResNet(3, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training_flops_per_example(model, torch.randn(2, 3, 16, 16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_batchnorm_heads_are_counted_in_eval_mode_on_a_batch_of_two():
    """A BatchNorm1d head sees one value per channel for one example: train mode would refuse it."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    assert training_flops_per_example(model, torch.randn(1, 4)) == 3 * 2 * (4 * 8 + 8 * 2) - 2 * 4 * 8


def test_an_uncountable_model_is_a_null_count_not_an_error():
    from autoflip_strategy.costs import training_flops_or_none

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("no forward for the counter")

    assert training_flops_or_none(Broken(), torch.zeros(2, 3)) is None
