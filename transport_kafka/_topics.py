"""Kafka topic names, and the check of topics the library did not create.

**Names.** Kafka treats ``.`` and ``_`` alike when it checks a new topic
name for collisions (``a.b`` and ``a_b`` cannot both exist, their metric
names would clash). Topic names join their parts (namespace, queue,
registry or stream name, fixed words) with ``.``; the parts are validated
names (``[A-Za-z0-9_-]``, starting with a letter or digit), so their ``_``
would be indistinguishable from a separator: ``NS.a_b.requests`` and
namespace ``NS_a``'s ``NS_a.b.requests`` would collide. :func:`topic_name`
therefore doubles every ``_`` of a part. Read with ``.`` and ``_`` as one
character, every run of it inside a part then has even length and every run
at a part boundary (the part's own doubled trailing ``_`` plus the one
separator; a part never starts with ``_``) has odd length, so the parts can
be read back: distinct part lists give distinct topics under Kafka's rule.

**Checks.** A topic that already exists (created by an operator, by broker
auto-creation, by an older release or by another process with other
options) is described once per transport at first use: its partition count,
``cleanup.policy`` and (for topics whose records must stay until consumed)
``retention.ms`` are compared with what the library would have created
(:class:`TopicSpec`). :func:`check_topic` says what would break a
guarantee (a ``ConfigurationError`` naming the topic and the fix) and what
is harmless (a warning).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.admin._resource import ResourceType

from transport.errors import InvalidNameError

__all__ = [
    "MAX_TOPIC_LENGTH",
    "TopicSpec",
    "TopicState",
    "check_topic",
    "checked_length",
    "describe_topics",
    "keep_until_consumed",
    "topic_name",
]

#: Kafka's limit on the length of a topic name.
MAX_TOPIC_LENGTH = 249

_COMPACT = frozenset({"compact"})
_NOT_AUTHORIZED = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
}


def topic_name(*parts: str) -> str:
    """``.``-joined ``parts`` with every ``_`` doubled (collision-free under
    Kafka's ``.`` = ``_`` rule, see the module docstring).

    Raises:
        InvalidNameError: the topic would be longer than Kafka allows.
    """
    return checked_length(".".join(part.replace("_", "__") for part in parts))


def checked_length(name: str) -> str:
    """``name`` if Kafka accepts a topic name that long.

    Raises:
        InvalidNameError: it is longer than Kafka allows.
    """
    if len(name) > MAX_TOPIC_LENGTH:
        raise InvalidNameError(
            "Kafka topic",
            name,
            f"longer than {MAX_TOPIC_LENGTH} characters (each '_' of a name is written "
            "as '__'); use shorter names",
        )
    return name


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic as the library creates it, and what its users rely on.

    ``what`` names the topic's role in messages (``"requests of queue 'q'"``).
    ``exact_partitions`` is ``None`` when another partition count is
    harmless, else why the count is a guarantee. ``compacted`` follows from
    ``config``: a compacted topic must keep the last record of every key
    forever (no ``delete`` policy); any other topic must not be compacted.
    ``compaction_loses`` says what compaction of a non-compacted topic
    would drop.
    """

    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    what: str = ""
    exact_partitions: str | None = None
    compaction_loses: str = "every record but the last of each key"
    #: What deletion by age would drop (a topic whose records must be kept
    #: until consumed, created with ``retention.ms=-1``); ``None`` where a
    #: finite retention is a choice (event-log streams).
    retention_loses: str | None = None

    @property
    def compacted(self) -> bool:
        return self.config.get("cleanup.policy") == "compact"


@dataclass(frozen=True, slots=True)
class TopicState:
    """What the broker says about an existing topic. ``cleanup_policy`` is
    ``None`` when the broker refused to describe its configuration."""

    partitions: int
    cleanup_policy: frozenset[str] | None
    #: ``retention.ms`` as reported (``None``: the broker did not say, i.e.
    #: its default, 7 days on Apache Kafka; -1: kept forever).
    retention_ms: int | None = None
    #: Replicas of the first partition.
    replicas: int = 1
    #: Topic-level ``min.insync.replicas`` and
    #: ``unclean.leader.election.enable`` (``None``: not reported).
    min_insync_replicas: int | None = None
    unclean_leader_election: bool | None = None
    #: The topic's id (a deleted and re-created topic has another one);
    #: ``None`` where the broker has none.
    topic_id: str | None = None
    #: ``delete.retention.ms``: how long compaction keeps a tombstone
    #: (``None``: not reported; Apache Kafka's default is 1 day).
    delete_retention_ms: int | None = None


def describe_topics(
    admin: AdminClient, names: Sequence[str], timeout: float
) -> dict[str, TopicState]:
    """Partition count, replicas, ``cleanup.policy``, ``retention.ms``,
    ``min.insync.replicas`` and ``unclean.leader.election.enable`` of
    existing topics: one DescribeTopics and one DescribeConfigs request
    (blocking).

    A ``cleanup.policy`` the broker does not list is Kafka's default,
    ``delete``. Raises: KafkaException (a missing topic, a broker error).
    """
    counts: dict[str, int] = {}
    replicas: dict[str, int] = {}
    ids: dict[str, str | None] = {}
    for name, future in admin.describe_topics(
        TopicCollection(list(names)), request_timeout=timeout
    ).items():
        description = future.result(timeout)
        partitions = description.partitions
        counts[name] = len(partitions)
        replicas[name] = min((len(p.replicas) for p in partitions), default=0)
        topic_id = str(description.topic_id) if description.topic_id is not None else ""
        ids[name] = None if topic_id.strip("A=") == "" else topic_id
    policies: dict[str, frozenset[str] | None] = {}
    others: dict[str, dict[str, str]] = {}
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in names]
    for resource, future in admin.describe_configs(resources, request_timeout=timeout).items():
        try:
            entries = future.result(timeout)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() in _NOT_AUTHORIZED:
                policies[resource.name] = None
                continue
            raise
        entry = entries.get("cleanup.policy")
        value = entry.value if entry is not None and entry.value else "delete"
        policies[resource.name] = frozenset(p.strip() for p in value.split(",") if p.strip())
        others[resource.name] = {
            key: str(e.value) for key, e in entries.items() if e is not None and e.value is not None
        }
    return {
        name: TopicState(
            counts[name],
            policies.get(name),
            retention_ms=_int(others.get(name, {}).get("retention.ms")),
            replicas=replicas[name],
            min_insync_replicas=_int(others.get(name, {}).get("min.insync.replicas")),
            unclean_leader_election=_bool(
                others.get(name, {}).get("unclean.leader.election.enable")
            ),
            topic_id=ids.get(name),
            delete_retention_ms=_int(others.get(name, {}).get("delete.retention.ms")),
        )
        for name in names
    }


def _int(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def _bool(value: str | None) -> bool | None:
    return None if value is None else value.strip().lower() == "true"


def keep_until_consumed(retention_bytes: int = -1) -> dict[str, str]:
    """Topic configs of a topic whose records must stay until consumed:
    no deletion by age; by size only with an explicit cap."""
    return {"retention.ms": "-1", "retention.bytes": str(retention_bytes)}


def check_topic(spec: TopicSpec, found: TopicState) -> tuple[list[str], list[str]]:
    """Compare an existing topic with ``spec``.

    Returns (problems that break a guarantee, harmless differences), each
    a sentence naming the topic and the fix.
    """
    errors: list[str] = []
    warnings: list[str] = []
    topic = f"Kafka topic {spec.name!r} ({spec.what})"
    if found.partitions != spec.partitions:
        if spec.exact_partitions is not None:
            errors.append(
                f"{topic} has {found.partitions} partitions, but {spec.exact_partitions}: "
                f"delete the topic (the library then creates it with {spec.partitions})"
            )
        else:
            hint = ""
            if found.partitions < spec.partitions:
                hint = (
                    f" (at most {found.partitions} worker process(es) share it; to grow it: "
                    f"kafka-topics --alter --topic {spec.name} --partitions {spec.partitions}, "
                    "after which requests of one ordering key may go to another partition)"
                )
            warnings.append(
                f"{topic} has {found.partitions} partitions where the library would create "
                f"{spec.partitions}; it is used as is{hint}"
            )
    policy = found.cleanup_policy
    if policy is None:
        warnings.append(
            f"{topic}: not authorized to read its cleanup.policy, not checked "
            f"(the library needs cleanup.policy={'compact' if spec.compacted else 'delete'})"
        )
    elif spec.compacted and policy != _COMPACT:
        shown = ",".join(sorted(policy))
        errors.append(
            f"{topic} has cleanup.policy={shown}, but the library reads the last record of "
            "every key from it and the 'delete' policy drops records older than retention.ms: "
            "set cleanup.policy=compact (kafka-configs --alter --entity-type topics "
            f"--entity-name {spec.name} --add-config cleanup.policy=compact) or delete the "
            "topic (the library then creates it compacted)"
        )
    elif not spec.compacted and "compact" in policy:
        shown = ",".join(sorted(policy))
        errors.append(
            f"{topic} has cleanup.policy={shown}: compaction would drop "
            f"{spec.compaction_loses}; set cleanup.policy=delete (kafka-configs --alter "
            f"--entity-type topics --entity-name {spec.name} --add-config "
            "cleanup.policy=delete) or delete the topic (the library then creates it)"
        )
    deletes = policy is None or "delete" in policy
    retention = found.retention_ms
    if spec.retention_loses is not None and deletes and retention is not None and retention >= 0:
        errors.append(
            f"{topic} has retention.ms={retention}: the broker deletes "
            f"{spec.retention_loses} older than that; set retention.ms=-1 "
            f"(kafka-configs --alter --entity-type topics --entity-name {spec.name} "
            "--add-config retention.ms=-1)"
        )
    return errors, warnings
