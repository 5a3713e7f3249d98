"""Operations: ``logging`` (client log, JSON log formatter), ``tracing`` (W3C
``traceparent`` propagation), ``top`` (``transport top``) and ``wireschema``
(``transport schemas``). The CLI itself is :mod:`transport.cli`, the
Prometheus exporter :mod:`transport.prometheus`.

Modules here import only :mod:`transport._spi` and :mod:`transport.errors`.
"""
