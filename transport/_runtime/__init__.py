"""The runtime built on the SPI: ``ensemble`` (:class:`Ensemble`, the worker
loop), ``network`` (:class:`Network`, request/answer between ensembles),
``outbox`` (:class:`Outbox`, durable sends through a local SQLite file),
``sqlitestore`` (the SQLite store thread the outbox and the ``sqlite://``
backend share) and ``shared`` (:class:`SharedRun`).

Modules here import :mod:`transport._spi`, :mod:`transport._ops` and
:mod:`transport.errors`; neither of those imports this package.
:mod:`transport.kit` re-exports ``SqliteStore`` and ``SharedRun`` to backends.
"""
