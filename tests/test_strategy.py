"""The strategy end to end through real ClientApp handlers (in-process grid, see runner/inprocess.py)."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy

from autoflip_strategy import (AutoFLIP, AutoFLIPClient, AutoFLIPConfig, EvalOutcome, EvalTask, RunFailed,
                               TrainOutcome, TrainTask)
from autoflip_strategy import protocol as P
from autoflip_task.data import load_federated_data
from autoflip_task.models import build_model, example_input
from autoflip_task.training import evaluate
from client_app.app import app as client_app
from runner.inprocess import InProcessGrid
from former_defaults import FORMER_DEFAULTS

SHAPE = (1, 8, 8)


def theta0():
    torch.manual_seed(0)
    return ArrayRecord(build_model("cnn", SHAPE, 10).state_dict())


def central_eval():
    data = load_federated_data("digits")
    model = build_model("cnn", SHAPE, 10)

    def fn(_round, arrays):
        model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
        loss, acc = evaluate(model, data.test_x, data.test_y)
        return MetricRecord({"loss": loss, "accuracy": acc})

    return fn


def run(rounds=3, nodes=6, faults=None, evaluate_fn=None, checkpoint=None, resume=False, arrays=None, **cfg):
    cfg = {**FORMER_DEFAULTS, "explore_epochs": 1, "fraction_train": 0.5, **cfg}
    grid = InProcessGrid(client_app, nodes, {"local-epochs": 1}, faults=faults)
    strategy = AutoFLIP(build_model("cnn", SHAPE, 10), example_input(SHAPE, 10), AutoFLIPConfig(**cfg),
                        train_config={"local-epochs": 1}, checkpoint=checkpoint)
    result = strategy.start(grid, arrays or theta0(), num_rounds=rounds, evaluate_fn=evaluate_fn, resume=resume)
    return strategy, result, grid


def test_pruned_run_hits_density_and_keeps_pruned_coordinates_zero():
    strategy, result, grid = run(rounds=3, sparsity=0.6, structured_sparsity=0.2)
    h = strategy.history
    assert [r["phase"] for r in h] == ["explore", "train", "train", "train"]
    assert h[-1]["density"] == pytest.approx(0.4, abs=0.02)
    final = result.arrays.to_torch_state_dict()
    for name, keep in strategy.layout.tensor_masks.items():
        assert torch.count_nonzero(final[name][~keep]) == 0, name
    # the exploration stage reached every node; training sampled half of them each round
    assert sum(1 for _, t in grid.delivered if t == P.EXPLORE) == 6
    assert all(len(r["sampled"]) == 3 for r in h[1:])
    # the mask travels once per node and mask version, not every round
    sent = sum(r["masks_sent"] for r in h[1:])
    assert sent == len({p for r in h[1:] for p in r["sampled"]})
    assert h[1]["bytes_up"] < 0.5 * h[0]["bytes_down"] / 6 * 3


def test_emptied_classifier_rows_are_warned_about_and_recorded(caplog):
    """Five classifier rows with tiny weights rank last under magnitude pruning and lose every input."""
    state = theta0().to_torch_state_dict()
    state["fc2.weight"][:5] *= 1e-3
    with caplog.at_level("WARNING"):
        plain, _, _ = run(rounds=1, strategy="magnitude", structured_sparsity=0.0, arrays=ArrayRecord(state))
    assert plain.history[1]["empty_output_rows"] == 5
    assert "Mask v1 leaves output rows with no input (fc2.weight: 5 of 10)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        floored, _, _ = run(rounds=1, strategy="magnitude", structured_sparsity=0.0, arrays=ArrayRecord(state),
                            min_output_density=0.5)
    assert floored.history[1]["empty_output_rows"] == 0 and "no input" not in caplog.text


def test_sparse_codec_and_dense_transport_give_bit_identical_models():
    _, sparse, _ = run(rounds=2, transport="sparse")
    _, dense, _ = run(rounds=2, transport="dense")
    a, b = sparse.arrays.to_torch_state_dict(), dense.arrays.to_torch_state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_baselines_share_sampling_and_fedavg_does_not_prune():
    fedavg, _, _ = run(rounds=2, strategy="fedavg")
    rnd, _, _ = run(rounds=2, strategy="random")
    auto, _, _ = run(rounds=2, strategy="autoflip")
    assert [r["sampled"] for r in fedavg.history[1:]] == [r["sampled"] for r in auto.history[1:]]
    assert [r["sampled"] for r in rnd.history[1:]] == [r["sampled"] for r in auto.history[1:]]
    assert fedavg.history[-1]["density"] == 1.0 and fedavg.history[0]["bytes_up"] == 0
    assert rnd.history[-1]["density"] == pytest.approx(0.5, abs=0.01)
    assert not rnd.mask.equals(auto.mask)
    # same sampled clients and epochs: analytic training FLOPs scale with the kept structure
    assert fedavg.history[-1]["train_flops"] > 1.5 * auto.history[-1]["train_flops"]


def _tamper(kind):
    """A fault that replaces partition 0's round-1 training reply with a malformed one."""

    def fault(partition, msg, reply):
        if partition != 0 or msg.metadata.message_type != "train" or reply is None or reply.has_error():
            return reply
        if kind == "silence":
            return None
        content = reply.content
        arrays, metrics = content[P.ARRAYS], dict(content[P.METRICS])
        arrays = ArrayRecord(array_dict={k: arrays[k] for k in arrays.keys()})
        name = "fc1.weight"
        good = arrays[name].numpy()
        if kind == "nan":
            arrays[name] = Array(np.full_like(good, np.nan))
        elif kind == "inf":
            arrays[name] = Array(np.full_like(good, np.inf))
        elif kind == "wrong-shape":
            arrays[name] = Array(good[:-5])
        elif kind == "wrong-tensors":
            arrays["extra.weight"] = Array(good)
        elif kind == "oversized":
            arrays[name] = Array(np.zeros(50_000_000 // 4, dtype=np.float32))
        elif kind == "pruned-nonzero":  # dense transport: values where the mask says zero
            arrays[name] = Array(np.ones_like(good))
        elif kind == "zero-examples":
            metrics[P.NUM_EXAMPLES] = 0
        elif kind == "negative-examples":
            metrics[P.NUM_EXAMPLES] = -3
        elif kind == "absurd-examples":
            metrics[P.NUM_EXAMPLES] = 10**12
        elif kind == "stale-mask":
            metrics[P.MASK_VERSION] = 999
        elif kind == "no-metrics":
            return Message(RecordDict({P.ARRAYS: arrays}), reply_to=msg)
        return Message(RecordDict({P.ARRAYS: arrays, P.METRICS: MetricRecord(metrics)}), reply_to=msg)

    return fault


@pytest.fixture(scope="module")
def without_partition0():
    """Reference: the same run where partition 0's reply never arrives."""
    return {t: run(rounds=2, faults=_tamper("silence"), transport=t,
                   max_payload_mb=10.0)[1].arrays.to_torch_state_dict()
            for t in ("sparse", "dense")}


@pytest.mark.parametrize("kind", ["nan", "inf", "wrong-shape", "wrong-tensors", "oversized", "pruned-nonzero",
                                  "zero-examples", "negative-examples", "absurd-examples", "stale-mask",
                                  "no-metrics"])
def test_malformed_replies_are_rejected_and_leave_no_trace(kind, without_partition0):
    transport = "dense" if kind == "pruned-nonzero" else "sparse"
    strategy, result, _ = run(rounds=2, faults=_tamper(kind), transport=transport, max_payload_mb=10.0)
    rejected = [r for h in strategy.history for r in h["rejected"]]
    assert any(r["partition"] == 0 for r in rejected), kind
    final = result.arrays.to_torch_state_dict()
    reference = without_partition0[transport]
    assert all(torch.equal(final[n], reference[n]) for n in final), kind


def test_crashes_are_recorded_and_too_few_replies_keep_the_model():
    def crash_all(partition, msg, reply):
        if msg.metadata.message_type == "train":
            return Message(Error(code=1, reason="boom"), reply_to=msg)
        return reply

    strategy, result, _ = run(rounds=1, faults=crash_all, min_train_replies=1)
    assert len(strategy.history[1]["dropped"]) == 3
    assert "boom" in strategy.history[1]["dropped"][0]["reason"]
    assert strategy.history[1]["replied"] == []


def test_exploration_survives_crashing_and_silent_explorers():
    def fault(partition, msg, reply):
        if msg.metadata.message_type == P.EXPLORE and partition < 2:
            return None if partition == 0 else Message(Error(code=1, reason="oom"), reply_to=msg)
        return reply

    strategy, _, _ = run(rounds=1, faults=fault)
    assert sorted(strategy.history[0]["replied"]) == [2, 3, 4, 5]
    assert {d["partition"] for d in strategy.history[0]["dropped"]} == {0, 1}
    assert strategy.history[-1]["density"] == pytest.approx(0.5, abs=0.02)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    _, full, _ = run(rounds=4, checkpoint=tmp_path / "a.pt")
    run(rounds=2, checkpoint=tmp_path / "b.pt")  # "killed" after round 2
    resumed, result, grid = run(rounds=4, checkpoint=tmp_path / "b.pt", resume=True)
    assert [h["round"] for h in resumed.history] == [0, 1, 2, 3, 4]
    assert not any(t == P.EXPLORE for _, t in grid.delivered)  # exploration is not repeated
    a, b = full.arrays.to_torch_state_dict(), result.arrays.to_torch_state_dict()
    assert max(float((a[n] - b[n]).abs().max()) for n in a) <= 1e-6


def test_resume_refuses_a_checkpoint_with_other_settings(tmp_path):
    run(rounds=1, checkpoint=tmp_path / "c.pt")
    with pytest.raises(ValueError, match="sparsity"):
        run(rounds=2, checkpoint=tmp_path / "c.pt", resume=True, sparsity=0.7)


def test_resume_reads_a_checkpoint_written_before_an_option_existed(tmp_path):
    """A checkpoint from a version without ``min_output_density`` was made under its default (0)."""
    run(rounds=1, checkpoint=tmp_path / "old.pt")
    payload = torch.load(tmp_path / "old.pt", weights_only=True)
    config = json.loads(payload["config"])
    del config["min_output_density"]
    torch.save({**payload, "config": json.dumps(config)}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"min_output_density: 0.0 -> 0.5"):
        run(rounds=2, checkpoint=tmp_path / "old.pt", resume=True, min_output_density=0.5)
    resumed, _, _ = run(rounds=2, checkpoint=tmp_path / "old.pt", resume=True)
    assert [h["round"] for h in resumed.history] == [0, 1, 2]


def test_thirty_percent_failures_cost_little_accuracy():
    rng = np.random.default_rng(0)

    def flaky(partition, msg, reply):
        if msg.metadata.message_type == "train" and rng.random() < 0.3:
            return None if rng.random() < 0.5 else Message(Error(code=1, reason="flaky"), reply_to=msg)
        return reply

    evaluate_fn = central_eval()
    clean, _, _ = run(rounds=12, nodes=10, evaluate_fn=evaluate_fn)
    faulty, _, _ = run(rounds=12, nodes=10, evaluate_fn=evaluate_fn, faults=flaky)
    dropped = sum(len(h["dropped"]) for h in faulty.history[1:])
    assert dropped >= 0.15 * 12 * 5
    assert faulty.history[-1]["accuracy"] > 0.8
    assert abs(faulty.history[-1]["accuracy"] - clean.history[-1]["accuracy"]) <= 0.02


def test_federated_evaluation_on_clients_is_recorded():
    strategy, result, grid = run(rounds=1, fraction_evaluate=0.5)
    assert 0.0 <= strategy.history[1]["client_accuracy"] <= 1.0
    assert sum(1 for _, t in grid.delivered if t == "evaluate") == 3
    assert 1 in result.evaluate_metrics_clientapp


# ------------------------------------------------------------- Flower's data flow (issue 12)
def test_flowers_own_start_explores_prunes_and_reports_bytes_in_the_result():
    """Flower's base ``Strategy.start`` drives exploration and masks through the hooks alone."""
    grid = InProcessGrid(client_app, 6, {"local-epochs": 1})
    strategy = AutoFLIP(build_model("cnn", SHAPE, 10), example_input(SHAPE, 10), fraction_train=0.5,
                        fraction_evaluate=0.0, explore_epochs=1, **{**FORMER_DEFAULTS, "sparsity": 0.6})
    result = Strategy.start(strategy, grid, theta0(), num_rounds=2)
    assert [r["phase"] for r in strategy.history] == ["explore", "train", "train"]
    assert sum(1 for _, t in grid.delivered if t == P.EXPLORE) == 6
    assert strategy.history[-1]["density"] == pytest.approx(0.4, abs=0.02)
    final = result.arrays.to_torch_state_dict()
    for name, keep in strategy.layout.tensor_masks.items():
        assert torch.count_nonzero(final[name][~keep]) == 0, name
    metrics = result.train_metrics_clientapp[2]
    assert metrics["density"] == pytest.approx(strategy.history[-1]["density"])
    assert metrics["bytes_up"] == strategy.history[-1]["bytes_up"] > 0 and "train_loss" in metrics


def test_differential_privacy_wrapper_composes_and_pruning_stays_intact():
    """Flower's server-side DP clips the (dense-transport) replies against the masked global model."""
    grid = InProcessGrid(client_app, 6, {"local-epochs": 1})
    strategy = AutoFLIP(build_model("cnn", SHAPE, 10), example_input(SHAPE, 10), fraction_train=0.5,
                        fraction_evaluate=0.0, explore_epochs=1, transport="dense", **FORMER_DEFAULTS)
    dp = DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier=0.01, clipping_norm=5.0,
                                                    num_sampled_clients=3)
    result = dp.start(grid, theta0(), num_rounds=3)
    h = strategy.history
    assert [r["phase"] for r in h] == ["explore", "train", "train", "train"]
    assert all(len(r["replied"]) == 3 and not r["rejected"] for r in h[1:])  # clipped replies keep their zeros
    assert h[-1]["density"] == pytest.approx(0.5, abs=0.02)
    assert set(result.train_metrics_clientapp) == {1, 2, 3}
    # what the clients received was pruned, even though DP noise touched every coordinate of the aggregate
    for name, keep in strategy.layout.tensor_masks.items():
        assert torch.count_nonzero(strategy.state[name][~keep]) == 0, name


def test_differential_privacy_wrapper_over_sparse_transport_is_refused_with_the_fix():
    strategy = AutoFLIP(build_model("cnn", SHAPE, 10), example_input(SHAPE, 10), fraction_evaluate=0.0)
    dp = DifferentialPrivacyServerSideFixedClipping(strategy, 0.01, 5.0, 2)
    with pytest.raises(ValueError, match='transport="dense"'):
        dp.start(InProcessGrid(client_app, 2, {"local-epochs": 1}), theta0(), num_rounds=1)


def test_every_client_failing_stops_the_run_with_the_most_common_error():
    def crash_all(partition, msg, reply):
        if msg.metadata.message_type in ("train", P.EXPLORE):
            return Message(Error(code=1, reason="boom" if partition else "other"), reply_to=msg)
        return reply

    grid = InProcessGrid(client_app, 4, {"local-epochs": 1})
    strategy = AutoFLIP(build_model("cnn", SHAPE, 10), example_input(SHAPE, 10), fraction_train=1.0,
                        fraction_evaluate=0.0, explore_epochs=1, max_failed_rounds=3)
    grid.faults = crash_all
    with pytest.raises(RunFailed) as err:
        strategy.start(grid, theta0(), num_rounds=10)
    assert "boom" in err.value.reason and "other" not in err.value.reason
    assert [r["round"] for r in strategy.history] == [0, 1, 2]  # exploration counts as a failed round
    assert all(r["failed"] for r in strategy.history)


def test_a_round_with_one_accepted_reply_resets_the_failure_count():
    def crash_most(partition, msg, reply):
        if msg.metadata.message_type == "train" and partition:
            return Message(Error(code=1, reason="boom"), reply_to=msg)
        return reply

    strategy, _, _ = run(rounds=4, faults=crash_most, fraction_train=1.0, max_failed_rounds=1, nodes=4)
    assert [len(r["replied"]) for r in strategy.history[1:]] == [1, 1, 1, 1]


# ------------------------------------------------------------- FedAvg-shaped constructor
def test_constructor_takes_fedavgs_arguments_and_defaults_with_one_precedence():
    model, x = build_model("cnn", SHAPE, 10), example_input(SHAPE, 10)
    plain = AutoFLIP(model, x)
    assert (plain.config.fraction_train, plain.config.fraction_evaluate) == (1.0, 1.0)  # FedAvg's defaults
    assert plain.config.max_failed_rounds == 3
    layered = AutoFLIP(model, x, AutoFLIPConfig(fraction_train=0.3, sparsity=0.4),
                       run_config={"fraction-train": 0.4, "sparsity": 0.7, "local-epochs": 3, "lr": 0.05,
                                   "batch-size": 8},
                       train_config={"lr": 0.01})
    assert layered.config.fraction_train == 0.4 and layered.config.sparsity == 0.7  # run config over config
    assert layered.train_config == {"local-epochs": 3, "lr": 0.01}  # train_config over forwarded run config
    explicit = AutoFLIP(model, x, run_config={"fraction-train": 0.4}, fraction_train=0.6, min_evaluate_nodes=1,
                        weighted_by_key="n", arrayrecord_key="a", configrecord_key="c")
    assert explicit.config.fraction_train == 0.6 and explicit.config.min_evaluate_nodes == 1
    with pytest.raises(TypeError, match="by keyword"):
        AutoFLIP(model, x, 0.5)
    with pytest.raises(TypeError, match="spars1ty"):
        AutoFLIP(model, x, spars1ty=0.5)


# ------------------------------------------------------------- client side
SEEN: list[tuple[str, int, dict]] = []


def _capturing_client() -> ClientApp:
    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(16, *SHAPE, generator=gen), torch.randint(0, 10, (16,), generator=gen)

    def train_fn(model, task: TrainTask) -> TrainOutcome:
        SEEN.append((task.phase, task.epochs, dict(task.config)))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loss = torch.nn.functional.cross_entropy(model(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return TrainOutcome(len(xs), float(loss.detach()))

    def evaluate_fn(model, task: EvalTask) -> EvalOutcome:
        SEEN.append(("evaluate", task.server_round, dict(task.config)))
        return EvalOutcome(len(xs), 1.0, 0.5, {"eval_extra": 2.0})

    return AutoFLIPClient(lambda ctx: build_model("cnn", SHAPE, 10), train_fn, evaluate_fn).build_app()


def test_user_config_reaches_the_functions_alone_and_local_epochs_follow_the_run_config():
    SEEN.clear()
    grid = InProcessGrid(_capturing_client(), 2, {"local-epochs": 3})
    strategy = AutoFLIP(build_model("cnn", SHAPE, 10), example_input(SHAPE, 10), explore_epochs=1,
                        run_config={"lr": 0.1}, train_config={"batch": 4}, evaluate_config={"split": "val"},
                        **FORMER_DEFAULTS)
    result = strategy.start(grid, theta0(), num_rounds=1, train_config=ConfigRecord({"mine": 1}))
    train = [cfg for phase, _, cfg in SEEN if phase == "train"]
    assert train == [{"lr": 0.1, "batch": 4, "mine": 1, "server-round": 1}] * 2
    assert {epochs for phase, epochs, _ in SEEN if phase == "train"} == {3}  # the node's run config
    assert [cfg for phase, _, cfg in SEEN if phase == "explore"] == [{"lr": 0.1, "batch": 4, "server-round": 0}] * 2
    assert [cfg for phase, _, cfg in SEEN if phase == "evaluate"] == [{"split": "val", "server-round": 1}] * 2
    assert result.evaluate_metrics_clientapp[1]["eval_acc"] == 0.5
    assert result.evaluate_metrics_clientapp[1]["eval_extra"] == 2.0


def test_a_plain_flower_handler_fails_with_an_error_that_names_the_fix():
    app = ClientApp()

    @app.train()
    def train(msg, context):  # a quickstart-style handler, not AutoFLIP's
        model = build_model("cnn", SHAPE, 10)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict())}), reply_to=msg)

    grid = InProcessGrid(app, 2)
    strategy = AutoFLIP(build_model("cnn", SHAPE, 10), example_input(SHAPE, 10), strategy="fedavg",
                        fraction_evaluate=0.0, max_failed_rounds=1)
    with pytest.raises(RunFailed, match="AutoFLIPClient"):
        strategy.start(grid, theta0(), num_rounds=2)

    own = ClientApp()

    @own.evaluate()
    def evaluate(msg, context):
        return msg

    with pytest.raises(ValueError, match="evaluate_fn"):
        AutoFLIPClient(lambda ctx: build_model("cnn", SHAPE, 10), lambda m, t: None).register(own)


def test_fedavgs_record_keys_are_honoured_end_to_end():
    """Other weighting / array / config keys: the user's config still arrives, the weight key stays out of
    the averaged metrics, and nothing is rejected."""
    SEEN.clear()
    grid = InProcessGrid(_capturing_client(), 2)
    strategy = AutoFLIP(build_model("cnn", SHAPE, 10), example_input(SHAPE, 10), explore_epochs=1,
                        fraction_evaluate=0.0, weighted_by_key="n", arrayrecord_key="a", configrecord_key="c",
                        train_config={"lr": 0.1}, **FORMER_DEFAULTS)
    result = strategy.start(grid, theta0(), num_rounds=1)
    assert [cfg for phase, _, cfg in SEEN if phase == "train"] == [{"lr": 0.1, "server-round": 1}] * 2
    assert all(len(r["replied"]) == 2 and not r["rejected"] for r in strategy.history)
    metrics = result.train_metrics_clientapp[1]
    assert "train_loss" in metrics and "n" not in metrics and "num-examples" not in metrics


def test_failed_client_evaluations_are_filed_apart_from_training_and_name_the_fix():
    no_eval = AutoFLIPClient(lambda ctx: build_model("cnn", SHAPE, 10),
                             lambda model, task: TrainOutcome(4, 1.0)).build_app()
    grid = InProcessGrid(no_eval, 2)
    strategy = AutoFLIP(build_model("cnn", SHAPE, 10), example_input(SHAPE, 10), explore_epochs=1)  # evaluates
    result = strategy.start(grid, theta0(), num_rounds=2)
    for r in strategy.history[1:]:
        assert len(r["replied"]) == 2 and not r["dropped"]
        assert len(r["eval_dropped"]) == 2 and "evaluate_fn" in r["eval_dropped"][0]["reason"]
    assert not result.evaluate_metrics_clientapp and set(result.train_metrics_clientapp) == {1, 2}
