"""runner.results.summarise: the launcher's closing line splits traffic into one-off and per-round."""

from runner.results import summarise


def test_summary_splits_the_one_off_stage_from_the_mean_training_round():
    rounds = [{"round": 0, "phase": "explore", "bytes_down": 1_000_000, "bytes_up": 500_000, "accuracy": 0.1},
              {"round": 1, "phase": "train", "bytes_down": 200_000, "bytes_up": 200_000, "accuracy": 0.5,
               "density": 0.5},
              {"round": 2, "phase": "train", "bytes_down": 100_000, "bytes_up": 100_000, "accuracy": 0.6,
               "density": 0.5}]
    line = summarise({"status": "completed", "rounds": rounds})
    assert "rounds 2 |" in line and "final accuracy 0.6000" in line
    assert "total down 1.300 MB, up 0.800 MB (exploration included)" in line
    assert line.endswith("one-off 1.500 MB, per round 0.300 MB")  # (0.4 + 0.2) / 2 training rounds


def test_summary_of_a_run_without_rounds_says_so():
    assert summarise({"status": "failed", "rounds": []}) == "status failed: no rounds recorded"


def test_free_ports_are_distinct_and_bindable():
    import socket

    from runner.common import free_ports

    ports = free_ports(7)
    assert len(set(ports)) == 7
    for port in ports:  # each one is free again once chosen
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
