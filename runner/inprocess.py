"""Run a Flower app's ServerApp and ClientApp in one process, without Ray or a SuperLink.

Why: Flower's simulation engine needs Ray, which cannot be installed everywhere
(e.g. a rented GPU machine that only takes small wheels), and strategy tests want
many deterministic rounds in seconds. Here the real ``ServerApp`` object drives a
:class:`InProcessGrid` that hands each message to the real ``ClientApp`` of the
addressed node, one node after another, with one ``Context`` (and so one
``context.state``) per node, exactly as a SuperNode keeps it.

With ``wire=True`` (the default of :func:`run_inprocess`) every message and
reply is serialised to Flower's protobuf bytes and parsed back, so what a
client receives is what a SuperNode would have received, and the bytes on the
wire are counted (``InProcessGrid.wire_bytes``).

What differs from ``flwr run``: nodes run one at a time (no parallel actors, so
client wall-clock is the sum, not the max), and there is no network, timeout or
node churn. Sampling, seeds and aggregation are the strategy's, so a seed gives
the same run as the simulation engine (``tests/test_simulation.py`` checks it).

Library use::

    from runner.inprocess import run_inprocess
    path = run_inprocess({"num-server-rounds": 3}, 4, output_dir=Path("outputs"))

Command line::

    python -m runner.inprocess --num-nodes 10 --output-dir outputs --run-config "device=cuda"
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

REPO_ROOT = Path(__file__).resolve().parents[1]

# (node partition, message, honest reply or None) -> reply to deliver, or None for silence
Fault = Callable[[int, Message, Message | None], Message | None]


class InProcessRunError(RuntimeError):
    """The in-process run did not complete (the message gives the results file's status and reason)."""


def _over_the_wire(msg: Message) -> tuple[Message, int]:
    """The message as the receiver would parse it from Flower's protobuf bytes, and their count."""
    data = message_to_proto(msg).SerializeToString()
    proto = ProtoMessage()
    proto.ParseFromString(data)
    return message_from_proto(proto), len(data)


class InProcessGrid(Grid):
    """A ``Grid`` whose nodes are ``ClientApp`` calls in this process.

    ``faults`` lets a test replace a node's reply (crash, malformed payload, silence).
    """

    def __init__(self, app: ClientApp, num_nodes: int, run_config: Mapping[str, Any] | None = None,
                 faults: Fault | None = None, first_node_id: int = 1000, wire: bool = False) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.app, self.faults, self.wire = app, faults, wire
        self.contexts = {
            first_node_id + i: Context(1, first_node_id + i, {"partition-id": i, "num-partitions": num_nodes},
                                       RecordDict(), dict(run_config or {}))
            for i in range(num_nodes)
        }
        self.delivered: list[tuple[int, str]] = []
        self.wire_bytes = {"down": 0, "up": 0}  # serialised messages, when ``wire``
        self._pushed: dict[str, list[Message]] = {}  # replies to pushed messages, until pulled

    # the abstract parts of Grid that a strategy does not use here
    def set_run(self, run):  # pragma: no cover
        self._run = run

    @property
    def run(self):  # pragma: no cover
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver now (as ``send_and_receive``) and keep the replies for :meth:`pull_messages`."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.metadata.message_id or uuid.uuid4().hex  # as Flower's grids
            ids.append(msg.metadata.message_id)
            self._pushed[ids[-1]] = list(self.send_and_receive([msg]))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [reply for i in message_ids for reply in self._pushed.pop(i, [])]

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            ctx = self.contexts[node]
            self.delivered.append((int(ctx.node_config["partition-id"]), msg.metadata.message_type))
            if self.wire:
                msg, size = _over_the_wire(msg)
                self.wire_bytes["down"] += size
            TaskIdentity.node_id = node
            try:
                reply = self.app(msg, ctx)
            except Exception as exc:  # what the SuperNode turns into an error reply
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=msg)
            finally:
                TaskIdentity.node_id = 0
            if self.faults is not None:
                reply = self.faults(int(ctx.node_config["partition-id"]), msg, reply)
            if reply is not None:
                if self.wire:
                    reply, size = _over_the_wire(reply)
                    self.wire_bytes["up"] += size
                replies.append(reply)
        return replies


def _component(ref: str, app_dir: Path) -> Any:
    """``module:attribute`` imported with ``app_dir`` on the path."""
    module, _, attr = ref.partition(":")
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    return getattr(importlib.import_module(module), attr)


def load_app(app_dir: Path = REPO_ROOT) -> tuple[ServerApp, ClientApp, dict[str, Any]]:
    """The app's ServerApp, ClientApp and default run config, as ``flwr run`` reads them."""
    tool = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    components = tool["components"]
    return (_component(components["serverapp"], app_dir), _component(components["clientapp"], app_dir),
            dict(tool.get("config", {})))


def run_inprocess(run_config: Mapping[str, Any], num_nodes: int, *, output_dir: Path,
                  app_dir: Path = REPO_ROOT, wire: bool = True, faults: Fault | None = None,
                  grid_class: Callable[..., InProcessGrid] | None = None) -> Path:
    """Run the app with ``num_nodes`` in-process nodes; return the ``results.json`` its ServerApp wrote.

    Follows ``runner.simulation``'s convention: ``output-dir`` is set to ``output_dir`` and the
    run must end with a ``<output_dir>/<run folder>/results.json`` whose status is ``completed``.
    ``faults`` replaces node replies as in :class:`InProcessGrid`. The run config is checked as
    ``runner.simulation`` checks it (:func:`check_run_config`) before the ServerApp starts. A
    ServerApp error before it wrote any results (a bad config, a checkpoint that does not fit)
    is raised as it is; a run that started but did not complete
    raises :class:`InProcessRunError` with the results file's status and reason (the ServerApp's
    exception as ``__cause__``).
    """
    from runner.results import RESULTS_PATTERN, find_results, not_completed
    from runner.runconfig import OUTPUT_DIR_KEY, check_run_config, resolve_path_keys

    server, client, defaults = load_app(app_dir)
    output_dir = Path(output_dir).resolve()
    overrides = resolve_path_keys({**run_config, OUTPUT_DIR_KEY: str(output_dir)}, Path.cwd())
    check_run_config(overrides, app_dir, num_nodes)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = {**defaults, **overrides}
    grid = (grid_class or InProcessGrid)(client, num_nodes, config, faults=faults, wire=wire)  # a test's subclass
    before = find_results(output_dir, RESULTS_PATTERN)
    error: Exception | None = None
    try:
        server(grid, Context(1, 0, {}, RecordDict(), config))
    except Exception as exc:  # the ServerApp failed: report its recorded reason, else the exception
        error = exc
    written = [p for p, mtime in find_results(output_dir, RESULTS_PATTERN).items() if before.get(p) != mtime]
    if not written:
        if error is not None:
            raise error  # refused before the run started (a bad config, a checkpoint that does not fit)
        raise InProcessRunError(f"the ServerApp wrote no {RESULTS_PATTERN} under {output_dir}")
    path = max(written, key=lambda p: p.stat().st_mtime_ns)
    why = not_completed(path, None)
    if why is not None or error is not None:
        raise InProcessRunError(why or f"{path}: {type(error).__name__}: {error}") from error
    if wire:  # what Flower's serialisation put on the (virtual) wire, beside the app's own accounting
        (path.parent / "wire_bytes.json").write_text(json.dumps(grid.wire_bytes))
    return path


def main(argv: list[str] | None = None) -> int:
    from runner.results import report
    from runner.runconfig import parse_override_args

    parser = argparse.ArgumentParser(prog="python -m runner.inprocess", description=__doc__.split("\n")[0])
    parser.add_argument("--num-nodes", type=int, default=10, help="clients (default 10)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where the run folder goes")
    parser.add_argument("--run-config", action="append", default=[], metavar='"k=v ..."',
                        help="run-config overrides in Flower's syntax, e.g. \"num-server-rounds=3 device='cuda'\"")
    args = parser.parse_args(argv)
    overrides = parse_override_args(parser, args.run_config)
    start = time.time()
    try:
        path = run_inprocess(overrides, args.num_nodes, output_dir=args.output_dir)
    except Exception as exc:  # noqa: BLE001 - one line and a non-zero exit, whatever stopped the run
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{report(path)}\n({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
