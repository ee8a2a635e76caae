"""A strategy family's declaration: everything the engine needs to know about it.

A family is one place: ``strategies/<family>/`` holds its declaration (a
:class:`Family` named ``FAMILY``, importable without torch or Flower), its
server side and its pure maths; ``clients/<family>.py`` its client side. The
engine, the config validation, the privacy layer and the CLI ask the
declaration; nothing outside the family compares strategy names.

Families are found through the entry-point group ``fedsim.strategies`` (the
built-in ones too, in fedsim's ``pyproject.toml``), so another installed package
adds a family with one line in its own ``pyproject.toml``::

    [project.entry-points."fedsim.strategies"]
    my-family = "my_package.family:FAMILY"

An entry point's name is the family name; it loads a :class:`Family` (or a
sequence of them, one per name).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class NoOptions:
    """The option table of a family without options of its own."""


def load(spec: str) -> Any:
    """Import ``"module:attribute"`` and return the attribute."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Family:
    """One strategy family.

    Parameters
    ----------
    name : str
        The ``strategy.name`` that selects it.
    summary : str
        One line for ``fedsim list`` (paper and what it does).
    server : str
        ``"module:callable"``: ``build(setup: fedsim.protocol.ServerSetup) ->
        Strategy``, a Flower message-API strategy. Its round runs through
        :func:`fedsim.protocol.rounds.standard_round` unless it defines
        ``run_round`` (several exchanges, custom actions).
    client : str
        ``"module:Class"`` of the client algorithm: ``Class(experiment, info,
        device)`` with ``train`` / ``evaluate`` methods and one method per name
        in ``actions``.
    options : type
        Frozen dataclass of the family's own keys, declared with
        :func:`fedsim.core.schema.option`; they are ``<section>.<key>``.
    section : str
        The experiment table holding the option keys: ``strategy`` (the
        default) or a table of the family's own (e.g. ``split``: keys
        ``split.cut``...); it must not be one of the experiment's sections.
    peft : tuple of str
        The ``peft.method`` values the family runs (``("lora",)``: needs LoRA).
    global_model : bool
        Whether the server holds one global model that is evaluated on the
        held-out test set after each round. Without one, the clients' local
        evaluation is the run's headline accuracy.
    privacy : tuple of str
        The ``privacy.mechanism`` values the family supports.
    rejects : mapping of str to str
        Why a mechanism the family does not support cannot run (shown in the
        error).
    check : str
        ``"module:callable"``: ``check(experiment, model, data)`` run before
        anything is written; raises :class:`fedsim.core.errors.ConfigError`.
    actions : tuple of str
        Custom client actions: the server sends ``train.<action>`` messages, the
        ClientApp calls the client algorithm's ``<action>`` method.
    model : str
        ``"module:callable"``: ``adapt(model, experiment) -> nn.Module`` applied
        to the engine's built model before the initial arrays are taken (e.g.
        parameters of the family's own, such as soft prompts); the client side
        applies the same to its own build.
    audit : str
        ``"module:callable"``: what an honest-but-curious server sees of a
        client's train exchange, ``surface(sent, reply, public) -> Scene`` (see
        :mod:`fedsim.audit.replay`); empty: the family cannot be audited.
    server_state : bool
        Whether the server strategy keeps state across rounds besides the
        round driver's global arrays (a hypernetwork, a stage counter, an
        optimiser...). True: the strategy ``server`` builds implements
        :class:`fedsim.protocol.contract.ServerState` (``checkpoint_state()`` /
        ``restore_state(state)``), which the resume checkpoint saves after every
        round and gives back on ``--resume``. The engine checks the built
        strategy against this declaration before the first round and refuses
        a family whose strategy disagrees (either way).
    resume : str
        Empty: ``fedsim run --resume`` continues the family's runs exactly.
        Otherwise the reason it cannot (``--resume`` is refused with it).
    server_metrics : str
        ``"module:callable"``: ``metrics(setup, arrays) -> dict[str, float]``,
        more server-side metrics of the global model (e.g. HeteroFL's accuracy
        of each width's slice), recorded with its held-out evaluation; only
        for families with a global model.
    """

    name: str
    summary: str
    server: str
    client: str
    options: type = NoOptions
    section: str = "strategy"
    peft: tuple[str, ...] = ("none",)
    global_model: bool = True
    privacy: tuple[str, ...] = ("none",)
    rejects: Mapping[str, str] = field(default_factory=dict)
    check: str = ""
    actions: tuple[str, ...] = ()
    model: str = ""
    audit: str = ""
    server_state: bool = False
    resume: str = ""
    server_metrics: str = ""

    def load_server(self) -> Any:
        """The server-side factory."""
        return load(self.server)

    def load_client(self) -> Any:
        """The client algorithm class."""
        return load(self.client)

    def adapt_model(self, model: Any, experiment: Any) -> Any:
        """The engine's built model as the family runs it."""
        return load(self.model)(model, experiment) if self.model else model

    def more_server_metrics(self, setup: Any, arrays: Any) -> dict[str, float]:
        """The family's own server-side metrics of the global model, if any."""
        if not self.server_metrics:
            return {}
        return load(self.server_metrics)(setup, arrays)  # type: ignore[no-any-return]

    def run_check(self, experiment: Any, model: Any, data: Any) -> None:
        """The family's pre-run check, if it has one."""
        if self.check:
            load(self.check)(experiment, model, data)
