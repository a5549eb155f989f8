"""A Flower ``Grid`` that delivers messages to a real ClientApp in this process.

Strategy tests use it to run many deterministic rounds in seconds with real
``Message`` objects, real handlers and real serialised arrays; the
integration tests still go through real Flower runs. ``faults`` lets a test
replace a node's reply (crash, malformed payload, silence).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

# (node partition, message, honest reply or None) -> reply to deliver, or None for silence
Fault = Callable[[int, Message, Message | None], Message | None]


class InProcessGrid(Grid):
    def __init__(self, app: ClientApp, num_nodes: int, run_config: dict | None = None,
                 faults: Fault | None = None, first_node_id: int = 1000) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.app, self.faults = app, faults
        self.contexts = {
            first_node_id + i: Context(1, first_node_id + i, {"partition-id": i, "num-partitions": num_nodes},
                                       RecordDict(), dict(run_config or {}))
            for i in range(num_nodes)
        }
        self.delivered: list[tuple[int, str]] = []

    # the abstract parts of Grid that a strategy does not use here
    def set_run(self, run):  # pragma: no cover
        self._run = run

    @property
    def run(self):  # pragma: no cover
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            ctx = self.contexts[node]
            self.delivered.append((int(ctx.node_config["partition-id"]), msg.metadata.message_type))
            TaskIdentity.node_id = node
            try:
                reply = self.app(msg, ctx)
            except Exception as exc:  # what the SuperNode turns into an error reply
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=msg)
            if self.faults is not None:
                reply = self.faults(int(ctx.node_config["partition-id"]), msg, reply)
            if reply is not None:
                replies.append(reply)
        return replies
