"""Interoperation with other programs' wire formats.

:mod:`transport.interop.agentensemble` reads and writes the JSON records of
the AgentEnsemble Java project's Kafka transport (an opt-in codec, selected
with ``TransportConfig.request_codec = "agentensemble"``).
"""

from __future__ import annotations

__all__: list[str] = []
