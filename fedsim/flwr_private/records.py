"""Flower's private helpers for records and messages, as fedsim uses them."""

from __future__ import annotations

from flwr.app import RecordDict

#: Flower's functions this module calls, and their parameters.
PATCHED = {
    "flwr.common.serde.recorddict_to_proto": ("recorddict",),
    "flwr.common.serde.recorddict_from_proto": ("recorddict_proto",),
}


def recorddict_to_bytes(records: RecordDict) -> bytes:
    """A ``RecordDict`` as Flower serialises it (its protobuf message)."""
    from flwr.common.serde import recorddict_to_proto

    return bytes(recorddict_to_proto(records).SerializeToString())


def recorddict_from_bytes(data: bytes) -> RecordDict:
    """Inverse of :func:`recorddict_to_bytes`."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def set_task_identity(
    run_id: int | None, node_id: int | None, task_id: int | None
) -> None:
    """Flower 1.41 builds a ``Message`` only inside a task (a run, a node, a
    task id, which the runtime sets in each process): set them outside one (an
    in-process oracle, a benchmark), or clear them with None."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = (
        run_id,  # type: ignore[assignment]
        node_id,  # type: ignore[assignment]
        task_id,  # type: ignore[assignment]
    )
