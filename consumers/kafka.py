"""The network boundary: building, starting and checking Kafka clients.

aiokafka errors met while connecting are translated here into ``BrokerError``
with a message that says what to do; the server translates the few it meets
at run time (acknowledgements, commits) where they happen.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

from streamlstm.consumers.settings import ServeConfig
from streamlstm.errors import BrokerError

__all__ = [
    "KafkaClients",
    "client_options",
    "committed_offset",
    "ensure_topics",
    "lean_records",
    "partitions_of",
    "publish",
    "start_client",
    "stop_client",
]

logger = logging.getLogger(__name__)


def client_options(
    bootstrap_servers: str,
    *,
    security_protocol: str = "PLAINTEXT",
    sasl_mechanism: str | None = None,
    sasl_plain_username: str | None = None,
    sasl_plain_password: str | None = None,
    ssl_cafile: str | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    client_id: str = "streamlstm",
) -> dict[str, Any]:
    """Options shared by every client; SASL/SSL settings pass straight through."""
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers,
        "security_protocol": security_protocol,
        "client_id": client_id,
    }
    if sasl_mechanism:
        options["sasl_mechanism"] = sasl_mechanism
        options["sasl_plain_username"] = sasl_plain_username
        options["sasl_plain_password"] = sasl_plain_password
    if ssl_cafile or ssl_certfile or "SSL" in security_protocol:
        options["ssl_context"] = create_ssl_context(
            cafile=ssl_cafile, certfile=ssl_certfile, keyfile=ssl_keyfile
        )
    return options


def _as_read(tp: Any, record: Any) -> Any:
    return record


class _LeanResults(collections.OrderedDict[Any, Any]):
    """The fetcher's buffer of fetched partitions (``Fetcher._records``), each partition's
    records handed out as aiokafka read them (see ``lean_records``)."""

    def __setitem__(self, tp: Any, result: Any) -> None:
        partition_records = getattr(result, "_partition_records", None)
        if partition_records is not None and hasattr(partition_records, "_consumer_record"):
            # An instance attribute wins over the class's method, for this buffer only.
            partition_records._consumer_record = _as_read
        super().__setitem__(tp, result)


def lean_records(consumer: AIOKafkaConsumer) -> bool:
    """Make a started consumer's ``getmany`` hand out the records as aiokafka's record
    batch reads them, not as ``ConsumerRecord``; True when it took.

    Building a ``ConsumerRecord`` costs about 0.8 µs of CPU a record (a
    Python call and an 11-field dataclass), the largest single cost of the
    daemon's parent at 10k ticks/s. The records read keep ``offset``,
    ``timestamp``, ``key``, ``value`` and ``headers`` but have no ``topic``
    or ``partition``: those are ``getmany``'s keys (the codec reads them
    there). Only the conversion is skipped: transactions (aborted batches,
    control records), CRC checks and positions stay aiokafka's. On an
    aiokafka whose fetcher is laid out otherwise, nothing changes (False),
    and records stay ``ConsumerRecord``; the codec takes both.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    buffered = getattr(fetcher, "_records", None)
    if not isinstance(buffered, collections.OrderedDict) or (
        getattr(fetcher, "_key_deserializer", None) or getattr(fetcher, "_value_deserializer", None)
    ):
        return False
    if not isinstance(buffered, _LeanResults):
        lean = _LeanResults()
        for tp, result in buffered.items():  # fetched before this call
            lean[tp] = result
        fetcher._records = lean  # type: ignore[union-attr]
    return True


async def start_client(
    client: AIOKafkaConsumer | AIOKafkaProducer, bootstrap: str, *, lean: bool = False
) -> None:
    """Start ``client``; ``lean``: a consumer's ``getmany`` hands out its records as read
    (``lean_records``)."""
    try:
        await client.start()
    except KafkaError as exc:
        try:
            await client.stop()
        except Exception:  # best effort on an already broken client
            logger.debug("stopping a client that failed to start", exc_info=True)
        raise BrokerError(
            f"cannot reach Kafka at {bootstrap}: {exc}; check --bootstrap-servers and the "
            "security settings"
        ) from exc
    if lean and isinstance(client, AIOKafkaConsumer) and not lean_records(client):
        logger.info("this aiokafka's fetcher is laid out otherwise: records stay ConsumerRecord")


async def stop_client(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """Stop a client (a consumer leaves its group, a producer flushes); errors are logged."""
    try:
        await client.stop()
    except KafkaError:
        logger.warning("error while closing a Kafka client", exc_info=True)


async def partitions_of(producer: AIOKafkaProducer, topics: Iterable[str]) -> dict[str, list[int]]:
    """Each topic's partition ids, from the producer's metadata."""
    try:
        return {topic: sorted(await producer.partitions_for(topic)) for topic in topics}
    except KafkaError as exc:
        raise BrokerError(f"cannot read the partitions of {list(topics)}: {exc}") from exc


async def committed_offset(consumer: AIOKafkaConsumer, tp: Any) -> int | None:
    """The group's committed offset of ``tp`` (None when there is none)."""
    try:
        offset = await consumer.committed(tp)
    except KafkaError as exc:
        raise BrokerError(f"cannot read the committed offset of {tp}: {exc}") from exc
    return None if offset is None else int(offset)


async def publish(producer: AIOKafkaProducer, topic: str, key: bytes, value: bytes) -> None:
    """Send one record and wait for its acknowledgement."""
    try:
        await (await producer.send(topic, value=value, key=key))
    except KafkaError as exc:
        raise BrokerError(f"cannot publish to {topic}: {exc}") from exc


async def ensure_topics(
    options: dict[str, Any],
    topics: Iterable[str],
    *,
    create: bool,
    partitions: int,
    replication_factor: int = 1,
) -> None:
    """Fail clearly when a topic is missing, or create it when asked to."""
    admin = AIOKafkaAdminClient(**options)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [t for t in dict.fromkeys(topics) if t not in existing]
        if missing and not create:
            raise BrokerError(
                f"topic(s) {', '.join(missing)} do not exist; create them or pass --create-topics"
            )
        if missing:
            logger.info(
                "creating topics %s with %d partitions, replication factor %d",
                missing,
                partitions,
                replication_factor,
            )
            await admin.create_topics(
                [NewTopic(t, partitions, replication_factor) for t in missing]
            )
    except KafkaError as exc:
        raise BrokerError(
            f"cannot reach Kafka at {options['bootstrap_servers']} to check topics: {exc}; "
            "check --bootstrap-servers and the security settings"
        ) from exc
    finally:
        await admin.close()


class KafkaClients:
    """Builds the daemon's Kafka clients from one set of connection options.

    The server takes one of these so tests and benches can pass their own;
    every client shares the connection and security options.
    """

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    @classmethod
    def for_config(cls, config: ServeConfig) -> KafkaClients:
        """Clients with ``config``'s connection and security options."""
        return cls(
            client_options(
                config.bootstrap_servers,
                security_protocol=config.security_protocol,
                sasl_mechanism=config.sasl_mechanism,
                sasl_plain_username=config.sasl_plain_username,
                sasl_plain_password=config.sasl_plain_password,
                ssl_cafile=config.ssl_cafile,
                ssl_certfile=config.ssl_certfile,
                ssl_keyfile=config.ssl_keyfile,
                client_id=f"streamlstm-{config.instance_id}",
            )
        )

    @property
    def bootstrap(self) -> str:
        return str(self.options["bootstrap_servers"])

    async def ensure_topics(
        self, topics: Iterable[str], *, create: bool, partitions: int, replication_factor: int = 1
    ) -> None:
        await ensure_topics(
            self.options,
            topics,
            create=create,
            partitions=partitions,
            replication_factor=replication_factor,
        )

    async def producer(self, **settings: Any) -> AIOKafkaProducer:
        """A started producer."""
        producer = AIOKafkaProducer(**self.options, **settings)
        await start_client(producer, self.bootstrap)
        return producer

    def consumer(self, **settings: Any) -> AIOKafkaConsumer:
        """A consumer, not yet started (subscribe it first, then ``start_client``)."""
        return AIOKafkaConsumer(**self.options, **settings)
