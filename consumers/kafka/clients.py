"""The network boundary: building, starting and checking Kafka clients.

aiokafka errors met while connecting are translated here into ``BrokerError``
with a message that says what to do; the server translates the few it meets
at run time (acknowledgements, commits) where they happen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

from streamlstm.consumers.kafka.internals import lean_records, probe
from streamlstm.consumers.settings import ServeConfig
from streamlstm.errors import BrokerError

__all__ = [
    "KafkaClients",
    "client_options",
    "committed_offset",
    "ensure_topics",
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
    if lean and isinstance(client, AIOKafkaConsumer):
        await probe()  # once per process; logs which way each fast path goes
        if not lean_records(client):
            logger.info("this consumer's records stay ConsumerRecord (lean_records not taken)")


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
