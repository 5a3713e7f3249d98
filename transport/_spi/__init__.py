"""The SPI and its models: what a backend implements and what callers hold.

Modules: ``transport`` (the :class:`Transport` base class and its
capabilities), ``connect`` (URL → backend), ``config``, ``queue``
(:class:`RequestQueue`, :class:`Delivery`), ``keyed`` (:class:`KeyedLog`),
``events`` (:class:`EventBus`, :class:`EventLog`), ``models``, ``codec``,
``naming``, ``jsonvalue``, ``doctor`` (provisioning and doctor records),
``metrics`` (the sink protocol and the instrumented queue every opened queue
is wrapped in), and the shared layers the base class opens, written once
over the SPI: ``priority`` (:class:`PriorityRequestQueue`) and
``registries`` (:class:`DeliveryRegistry`, :class:`CapabilityRegistry`).

Modules here import only each other and :mod:`transport.errors`, never
:mod:`transport._runtime.ensemble` or :mod:`transport._ops`.
"""
