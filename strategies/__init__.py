"""Server-side algorithms, one family per subpackage.

``strategies/<family>/__init__.py`` declares the family (a
:class:`fedsim.core.family.Family` named ``FAMILY``, importable without torch or
Flower) and states its paper and message contract; ``server.py`` builds the
Flower message-API strategy from the engine's
:class:`fedsim.protocol.setup.ServerSetup`;
``maths.py`` keeps the aggregation rules as pure numpy functions. Families are
registered through the ``fedsim.strategies`` entry points in ``pyproject.toml``.
"""
