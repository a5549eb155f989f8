"""The cost of one pass of Flower's simulation engine over its nodes, rebuilt on Flower's own classes.

Why ``benchmarks.bench_scale`` measures it: the partition handshake and every stage put messages in
flight to many nodes at once, and this pass decides what that costs as the federation grows.
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from typing import Any


def engine_sweep_costs(pairs: tuple[tuple[int, int], ...], reps: int = 2) -> list[dict[str, Any]]:
    """CPU seconds of one pass of Flower 1.41's simulation message extractor over all nodes.

    ``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue`` calls
    ``InMemoryLinkState.get_message_ins(node_id, limit=1)`` for *every* registered
    node, then sleeps 0.1 s, for as long as the run lasts; each call scans every
    message in the store (``_check_stored_messages`` on each). One pass therefore
    costs O(nodes x messages in flight). Rebuilt here on the real classes with
    (nodes, in-flight) pairs; messages are inserted directly into the store (as
    ``store_message_ins`` would after validation). Uses Flower internals: returns
    [] if they moved.
    """
    try:
        from flwr.app import Message, RecordDict
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
        from flwr.server.superlink.linkstate import LinkStateFactory
        from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
        from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
        from flwr.supercore.object_store import ObjectStoreFactory
        from flwr.supercore.run import Run
        from flwr.supercore.task_identity import TaskIdentity
        from flwr.superlink.federation import NoOpFederationManager
    except ImportError as exc:
        print(f"engine sweep measurement skipped: {exc!r}", file=sys.stderr)
        return []
    rows = []
    try:
        # lets Message() be built outside a run
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
        for nodes, in_flight in pairs:
            factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
            state = factory.state()
            run = Run.create_empty(1)
            run.federation_id = NOOP_FEDERATION_ID
            state.run_ids[1] = RunRecord(run=run)
            node_ids = list(_register_nodes(nodes, factory))
            for node in node_ids[:in_flight]:
                msg = Message(RecordDict(), dst_node_id=node, message_type="query.describe")
                md = msg.metadata.__dict__
                md.update(_run_id=1, _src_node_id=SUPERLINK_NODE_ID, _created_at=time.time(), _ttl=3600.0,
                          _message_id=uuid.uuid4().hex)
                state.message_ins_store[msg.metadata.message_id] = msg
            passes = []
            for _ in range(reps):  # the first pass also marks the messages delivered; later ones skip them
                t = time.process_time()
                for node in node_ids:
                    state.get_message_ins(node_id=node, limit=1)
                passes.append(time.process_time() - t)
            rows.append({"nodes": nodes, "in_flight": in_flight, "first_pass_cpu_s": passes[0],
                         "later_pass_cpu_s": statistics.fmean(passes[1:]) if len(passes) > 1 else passes[0]})
    except Exception as exc:  # internals changed: report, do not fail the benchmark
        print(f"engine sweep measurement failed: {exc!r}", file=sys.stderr)
    return rows
