"""Which nodes a strategy can sample: the partition handshake, absent nodes, seeded sampling, one reply per node.

Why a registry: Flower gives a ServerApp only random node ids (new ones every
run), so the strategy asks each node which data partition it holds
(``query.describe``) and samples in partition order; then a seed picks the
same clients in every run and for every method. This module owns what that
needs and what can go wrong with it:

* **Partition ids are validated** (:func:`parse_partition_id`): a finite
  integer in ``[0, 2**31)``, not held by another connected node. Anything else
  (NaN, Inf, 1e300, -1, 2.5, a string, a second claim on partition 0, an error
  reply) gives ``-1`` with the reason recorded; such nodes are still sampled
  (last, by node id), since they may hold data.
* **The handshake is bounded by its own timeout**: the nodes still to be asked
  get their messages 100 at a time (the simulation engine's cost grows with
  the messages in flight), all chunks under one ``handshake-timeout`` deadline
  (never the round timeout, never a timeout per chunk). Nodes a spent deadline
  leaves unasked count as absent and are probed at once, so a node that
  answers is back at the next sampling.
* **Absent nodes** (no reply to the handshake, or to a training, exploration or
  evaluation message within its timeout) are not sampled until they reply
  again. "Again" is noticed without waiting: where the Grid can push and pull
  (Flower's simulation and deployment grids), each absent node gets one
  pending ``query.describe`` probe, and the probes are pulled, never awaited,
  at the next sampling. Any later reply from the node also readmits it. When
  every connected node is absent, all of them are tried again (one timeout)
  rather than sampling no one.
* **One reply per node per message** (:func:`one_reply_per_node`): a reply is
  attributed to the node its message went to (via ``reply_to_message_id``
  where the grid assigns message ids, else its source node); a second reply for
  the same node, or a reply for a node that was not asked, is dropped.

Start-up at scale (why not ask every node): Flower 1.41's simulation engine
polls every node against every message in flight, so a handshake with *N*
nodes costs O(N²) CPU however it is chunked (measured ~8 minutes for 10 000
nodes). So the full handshake runs only while at most ``handshake-max-nodes``
nodes are connected (default 1000, a few seconds). Above that, partition ids
are learnt lazily: only the nodes a sample picks and that are not known yet
are asked (one bounded exchange of about ``k`` messages), and start-up no longer
depends on *N*. The price: the order of nodes not yet asked can only be their
node id, so the sample of such nodes is reproducible for the same seed *and*
node ids (the same run), not across runs whose node ids differ. Known nodes
keep the partition order, so the rule is the same in both regimes; with every
node known (the full handshake) it is exactly partition-order sampling.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from . import protocol as P

PARTITION_LIMIT = 2**31  # partition ids are in [0, PARTITION_LIMIT): any id a partitioner makes, and JSON-safe
UNKNOWN = -1
HANDSHAKE_CHUNK = 100  # describe messages in flight at once: the simulation engine's cost is nodes x in flight


# ------------------------------------------------------------------ pure rules
def parse_partition_id(value: Any) -> tuple[int, str | None]:
    """A reported partition id as an int, or ``(-1, why)`` when it is not a finite integer in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return UNKNOWN, f"partition id {value!r} is not a number"
    if isinstance(value, float):
        if not math.isfinite(value):
            return UNKNOWN, f"partition id {value!r} is not finite"
        if not value.is_integer():
            return UNKNOWN, f"partition id {value!r} is not an integer"
        value = int(value)
    if not 0 <= value < PARTITION_LIMIT:
        return UNKNOWN, f"partition id {value} is outside [0, 2**31)"
    return value, None


def reply_partition(reply: Message) -> tuple[int, str | None]:
    """The partition id a ``query.describe`` reply reports, or ``(-1, why)``."""
    if reply.has_error():
        return UNKNOWN, f"client error: {reply.error.reason}"
    metrics = reply.content.get(P.METRICS)
    if not isinstance(metrics, MetricRecord) or P.PARTITION_ID not in metrics:
        return UNKNOWN, "the reply carries no partition id"
    return parse_partition_id(metrics[P.PARTITION_ID])


def one_reply_per_node(sent: Iterable[Message],
                       replies: Iterable[Message]) -> tuple[list[tuple[int, Message]], list[tuple[int, str]]]:
    """``[(node, reply)]`` with the first reply for each addressed node, and ``[(node, why)]`` for the rest.

    A reply belongs to the node its message was sent to: found by
    ``reply_to_message_id`` when the grid gave the sent messages ids (Flower's
    grids do, in place), else by its source node (an in-process grid).
    """
    by_id, asked = {}, set()
    for msg in sent:
        asked.add(msg.metadata.dst_node_id)
        if msg.metadata.message_id:
            by_id[msg.metadata.message_id] = msg.metadata.dst_node_id
    kept, extra, seen = [], [], set()
    for reply in replies:
        node = by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if node not in asked:
            extra.append((node, "reply from a node that was not asked"))
        elif node in seen:
            extra.append((node, "duplicate reply (one reply per node per message)"))
        else:
            seen.add(node)
            kept.append((node, reply))
    return kept, extra


def order_key(node: int, partitions: dict[int, int]) -> tuple[bool, int, int]:
    """Partition order; nodes with no valid (or no known) partition id last, by node id."""
    pid = partitions.get(node, UNKNOWN)
    return pid < 0, pid, node


def sample_count(available: int, fraction: float, minimum: int) -> int:
    """How many of ``available`` nodes a stage samples (FedAvg's rule: a fraction, at least ``minimum``)."""
    return min(available, max(int(available * fraction), minimum))


def seeded_sample(nodes: Collection[int], partitions: dict[int, int], k: int, seed: int, purpose: str,
                  server_round: int) -> list[int]:
    """``k`` of ``nodes``, drawn by a generator seeded with (seed, purpose, round), in partition order.

    The draw is over the nodes *sorted by* :func:`order_key`, so it depends on the
    partition ids, not on the random node ids, wherever the partition ids are known.
    """
    ordered = sorted(nodes, key=lambda n: order_key(n, partitions))
    rng = random.Random(f"{seed}:{purpose}:{server_round}")
    position = {n: i for i, n in enumerate(ordered)}
    return sorted(rng.sample(ordered, k), key=position.__getitem__)


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, sleep: Callable[[float], None] = time.sleep) -> list[int]:
    """The connected node ids once at least ``minimum`` are connected; TimeoutError after ``timeout`` s."""
    deadline = time.time() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.time() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {minimum} nodes connected")
        log(INFO, "Waiting for nodes: %d of %d connected", len(nodes), minimum)
        sleep(1)
    return nodes


def describe_message(node: int, ttl: float | None = None) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type=P.DESCRIBE, ttl=ttl)


# ------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Absence:
    since: int  # the round in which the node last failed to answer
    reason: str


@dataclass
class NodeRegistry:
    """What the server knows about nodes: partition ids (validated), absent nodes, pending probes."""

    partitions: dict[int, int] = field(default_factory=dict)  # node id -> partition id (or -1)
    refused: dict[int, str] = field(default_factory=dict)  # node id -> why its partition id is -1
    absent: dict[int, Absence] = field(default_factory=dict)
    probes: dict[str, int] = field(default_factory=dict)  # message id of a pending probe -> node id
    probing: bool = True  # False once the grid turned out unable to push/pull (an in-process grid)
    _holders: dict[int, int] = field(default_factory=dict)  # partition id -> node id

    # ------------------------------------------------------------- learning
    def learn(self, node: int, reply: Message, connected: Collection[int]) -> str | None:
        """Record the partition id a describe reply reports; returns why it was refused, if it was."""
        pid, reason = reply_partition(reply)
        if pid >= 0:
            holder = self._holders.get(pid)
            if holder is not None and holder != node:
                if holder in connected and holder not in self.absent:
                    pid, reason = UNKNOWN, f"partition {pid} is already held by node {holder}"
                else:  # the holder left (a restarted node comes back with a new id): the claim moves
                    self.partitions.pop(holder, None)
        old = self.partitions.get(node, UNKNOWN)
        if old >= 0 and old != pid and self._holders.get(old) == node:
            del self._holders[old]
        self.partitions[node] = pid
        if pid >= 0:
            self._holders[pid] = node
            self.refused.pop(node, None)
        else:
            self.refused[node] = reason or "no partition id"
        return None if pid >= 0 else self.refused[node]

    def seen(self, node: int) -> None:
        """The node answered a message: it is no longer absent."""
        if self.absent.pop(node, None) is not None:
            log(INFO, "Node %d (partition %d) answers again", node, self.partitions.get(node, UNKNOWN))

    def mark_absent(self, node: int, server_round: int, reason: str) -> None:
        self.absent[node] = Absence(server_round, reason)

    def present(self, nodes: Iterable[int]) -> list[int]:
        """The nodes not marked absent; all of them when every one is absent (try them again)."""
        nodes = list(nodes)
        return [n for n in nodes if n not in self.absent] or nodes

    # ------------------------------------------------------------ exchanges
    def handshake(self, grid: Grid, nodes: list[int], connected: Collection[int], timeout: float,
                  server_round: int, first_contact: float = 0.0, chunk: int = HANDSHAKE_CHUNK) -> list[dict[str, Any]]:
        """Ask ``nodes`` for their partition, ``chunk`` messages at a time, all under one ``timeout``.

        Nodes that do not answer are marked absent (their unanswered messages become
        their probes), and so are the nodes of chunks the deadline leaves no time for
        (probed without waiting). Until any node has ever answered, the federation is
        taken to be starting, not absent: a chunk with no reply at all is awaited up to
        ``first_contact`` seconds (Flower's simulation engine builds every node's
        context before it serves any: minutes at 100 000 nodes), and the short
        deadline starts from the first reply. Returns the refusals (``{"node", "reason"}``).
        """
        if not nodes:
            return []
        connected = set(connected)
        start = time.perf_counter()
        deadline = time.monotonic() + timeout
        refusals, answered, asked = [], set(), 0

        def take(pairs: Iterable[tuple[int, Message]]) -> None:
            for node, reply in pairs:
                if reply.metadata.src_node_id != node or node in answered:  # e.g. the SuperLink: node offline
                    continue
                answered.add(node)
                self.seen(node)
                if (reason := self.learn(node, reply, connected)) is not None:
                    refusals.append({"node": node, "reason": reason})
                    log(WARNING, "Node %d: %s; it is sampled without a partition id", node, reason)

        while asked < len(nodes) and (left := deadline - time.monotonic()) > 0:
            sent = [describe_message(n) for n in nodes[asked:asked + chunk]]
            asked += len(sent)
            kept, _ = one_reply_per_node(sent, grid.send_and_receive(sent, timeout=left))
            if not kept and not self.heard and first_contact > left:
                log(INFO, "No node has answered yet: waiting up to %.0f s for the federation to start", first_contact)
                kept = self._await(grid, sent, time.monotonic() + first_contact - left, first_only=True)
                deadline = time.monotonic() + timeout
                kept += self._await(grid, [m for m in sent if m.metadata.dst_node_id not in {n for n, _ in kept}],
                                    deadline)
            take(kept)
            for msg in sent:  # an unanswered message is the node's probe: its late reply readmits it
                if msg.metadata.dst_node_id not in answered and msg.metadata.message_id:
                    self.probes[msg.metadata.message_id] = msg.metadata.dst_node_id
        silent = [n for n in nodes[:asked] if n not in answered]
        for node in silent:
            self.mark_absent(node, server_round, f"no reply to the partition handshake within {timeout:g} s")
        for node in nodes[asked:]:
            self.mark_absent(node, server_round, f"not asked: the handshake's {timeout:g} s ran out")
        silent += nodes[asked:]
        log(INFO, "Partition handshake: %d of %d nodes answered in %.1f s%s", len(answered), len(nodes),
            time.perf_counter() - start, f"; {len(silent)} marked absent" if silent else "")
        return refusals

    @property
    def heard(self) -> bool:
        """Has any node ever answered (a handshake or probe)?"""
        return bool(self.partitions)

    def _await(self, grid: Grid, sent: list[Message], until: float, first_only: bool = False,
               interval: float = 0.5) -> list[tuple[int, Message]]:
        """Pull late replies to ``sent`` (sent before, by id) until all came, or any when ``first_only``, or ``until``."""
        ids = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
        got: list[tuple[int, Message]] = []
        try:
            while ids and time.monotonic() < until:
                for reply in grid.pull_messages(list(ids)):
                    if (node := ids.pop(reply.metadata.reply_to_message_id, None)) is not None:
                        got.append((node, reply))
                if (got and first_only) or not ids:
                    break
                time.sleep(interval)
        except NotImplementedError:
            pass
        return got

    def poll_probes(self, grid: Grid, connected: Collection[int], ttl: float | None = None) -> list[dict[str, Any]]:
        """Send one probe to each absent node without one, then readmit those whose probe was answered.

        Never waits: a probe answered later is found at a later sampling; one
        unanswered after ``ttl`` seconds expires (Flower answers it with an error) and
        is sent again. Absent nodes that left are forgotten. Returns the refusals of readmitted nodes' partition ids.
        """
        connected = set(connected)
        for node in [n for n in self.absent if n not in connected]:
            del self.absent[node]
        if not self.probing or not (self.absent or self.probes):  # pull answered probes: Flower keeps them till then
            return []
        refusals = []
        try:
            waiting = set(self.probes.values())
            msgs = [describe_message(n, ttl) for n in self.absent if n not in waiting]
            if msgs:
                grid.push_messages(msgs)  # Flower's grids set each message's id in place
                self.probes.update({m.metadata.message_id: m.metadata.dst_node_id for m in msgs
                                    if m.metadata.message_id})
            for reply in list(grid.pull_messages(list(self.probes))) if self.probes else []:
                node = self.probes.pop(reply.metadata.reply_to_message_id, None)
                if node is None or reply.metadata.src_node_id != node:
                    continue  # expired, or the SuperLink reports the node offline: probed again next time
                self.seen(node)
                if (reason := self.learn(node, reply, connected)) is not None:
                    refusals.append({"node": node, "reason": reason})
        except NotImplementedError:
            self.probing = False
            log(WARNING, "This grid cannot push and pull messages: absent nodes return only when all are absent")
        return refusals

    # -------------------------------------------------------------- records
    def absent_record(self) -> list[dict[str, Any]]:
        """Absent nodes for results.json (node, partition if known, since which round, why)."""
        return [{"node": n, "partition": self.partitions.get(n, UNKNOWN), "since": a.since, "reason": a.reason}
                for n, a in sorted(self.absent.items())]

    # ------------------------------------------------------------- sampling
    def sample(self, grid: Grid, nodes: list[int], fraction: float, minimum: int, *, seed: int, purpose: str,
               server_round: int, handshake_timeout: float, handshake_max_nodes: int,
               probe_ttl: float | None = None, first_contact: float = 0.0) -> tuple[list[int], list[dict]]:
        """A seeded sample of the present nodes, in partition order, and the round's partition refusals.

        With at most ``handshake_max_nodes`` connected, every node not yet known is
        asked first (bounded by ``handshake_timeout``); above it only the sampled ones are (lazy).
        """
        refusals = []
        if len(nodes) <= handshake_max_nodes:
            new = [n for n in nodes if n not in self.partitions and n not in self.absent]
            refusals += self.handshake(grid, new, nodes, handshake_timeout, server_round, first_contact)
        refusals += self.poll_probes(grid, nodes, probe_ttl)  # after the handshake: probes its silent nodes now
        candidates = self.present(nodes)
        chosen = seeded_sample(candidates, self.partitions, sample_count(len(candidates), fraction, minimum),
                               seed, purpose, server_round)
        unknown = [n for n in chosen if n not in self.partitions]
        if unknown:  # lazy: learn partition ids of the sampled nodes only
            refusals += self.handshake(grid, unknown, nodes, handshake_timeout, server_round, first_contact)
            chosen = sorted((n for n in chosen if n in self.partitions),
                            key=lambda n: order_key(n, self.partitions))
        return chosen, refusals
