"""The AgentEnsemble (Java) wire dialect: an opt-in request codec.

Selected with ``TransportConfig.request_codec = "agentensemble"``: request
queues then write the Java project's Jackson records and read them besides
the library's own. :class:`AgentEnsembleResponder` is the ``Ensemble``
response hook that answers a Java caller on its ``TOPIC`` delivery. The
mapping, and how the Java side writes its records, is in
docs/interop-java.md and in :mod:`transport._spi.agentensemble`.
"""

from __future__ import annotations

from transport._spi.agentensemble import (
    CACHE_POLICIES,
    CODEC_NAME,
    DELIVERY_METHODS,
    HEADER_CACHE_KEY,
    HEADER_CACHE_POLICY,
    HEADER_DELIVERY_ADDRESS,
    HEADER_DELIVERY_METHOD,
    HEADER_FROM,
    HEADER_MAX_AGE,
    PRIORITY_LEVELS,
    AgentEnsembleCodec,
    AgentEnsembleResponder,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    format_duration,
    is_agentensemble_request,
    java_headers,
    parse_duration,
)

__all__ = [
    "CACHE_POLICIES",
    "CODEC_NAME",
    "DELIVERY_METHODS",
    "HEADER_CACHE_KEY",
    "HEADER_CACHE_POLICY",
    "HEADER_DELIVERY_ADDRESS",
    "HEADER_DELIVERY_METHOD",
    "HEADER_FROM",
    "HEADER_MAX_AGE",
    "PRIORITY_LEVELS",
    "AgentEnsembleCodec",
    "AgentEnsembleResponder",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "format_duration",
    "is_agentensemble_request",
    "java_headers",
    "parse_duration",
]
