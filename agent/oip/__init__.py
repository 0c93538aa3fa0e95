"""The Open Inference Protocol's gRPC messages (inference.proto), in a descriptor pool of their own."""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from agent.oip.descriptor import FILE_DESCRIPTOR_SET

__all__ = ["message"]

_pool = descriptor_pool.DescriptorPool()
for _file in descriptor_pb2.FileDescriptorSet.FromString(FILE_DESCRIPTOR_SET).file:
    _pool.Add(_file)


def message(name: str) -> Any:
    """Return the message class of ``inference.<name>`` (``ModelInferRequest``, ...)."""
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"inference.{name}"))
