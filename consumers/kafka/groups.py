"""Which member of a consumer group reads each partition of a topic.

``partition_owners`` asks the group's coordinator which member holds each
partition: Kafka Streams' ``queryMetadataForKey`` idea, so that a caller
asking the wrong instance about a stream (whose partition is
``outbox.partition_of`` of its key) learns which one to ask.

The group description comes back as aiokafka's raw ``DescribeGroupsResponse``
(its public admin client documents no parsed form); it is read here by the
field names of its own schema, and the assignment bytes with aiokafka's
``ConsumerProtocolMemberAssignment``: anything unexpected is logged and read
as "owner unknown", never raised into a request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError

__all__ = ["GroupMember", "partition_owners"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupMember:
    """A consumer group member, as the group's coordinator describes it."""

    member_id: str
    client_id: str
    host: str

    def to_json(self) -> dict[str, str]:
        return {"member_id": self.member_id, "client_id": self.client_id, "host": self.host}


async def partition_owners(
    options: dict[str, Any], group: str, topic: str
) -> dict[int, GroupMember]:
    """Each partition of ``topic`` that a member of ``group`` holds now, and that member
    (empty where the group is rebalancing, or the broker cannot say)."""
    admin = AIOKafkaAdminClient(**options)
    try:
        await admin.start()
        responses = await admin.describe_consumer_groups([group])
    except KafkaError as exc:
        logger.warning("cannot describe consumer group %s: %s", group, exc)
        return {}
    finally:
        await admin.close()
    try:
        return _owners(responses, group, topic)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        logger.warning("cannot read consumer group %s's description: %r", group, exc)
        return {}


def _owners(responses: list[Any], group: str, topic: str) -> dict[int, GroupMember]:
    owners: dict[int, GroupMember] = {}
    for response in responses:
        for described in _rows(response, "groups"):
            if described["group"] != group or described["error_code"] != 0:
                continue
            for member in described["members"]:
                raw = member["member_assignment"]
                if not raw:
                    continue
                who = GroupMember(member["member_id"], member["client_id"], member["client_host"])
                assignment = ConsumerProtocolMemberAssignment.decode(raw)
                for tp in assignment.partitions():
                    if tp.topic == topic:
                        owners[tp.partition] = who
    return owners


def _rows(struct: Any, name: str) -> list[dict[str, Any]]:
    """The array field ``name`` of a decoded protocol struct, each row by its field names
    (the row layout differs between protocol versions; the names do not)."""
    schema = type(struct).SCHEMA
    array = schema.fields[schema.names.index(name)]
    names = array.array_of.names
    rows = []
    for row in struct.get_item(name):
        item = dict(zip(names, row, strict=True))
        if "members" in item:
            members = array.array_of.fields[names.index("members")].array_of.names
            item["members"] = [dict(zip(members, m, strict=True)) for m in item["members"]]
        rows.append(item)
    return rows
