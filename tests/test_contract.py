"""The family contract in code (:mod:`fedsim.protocol.contract`): a server that
keeps state must say so and save it; the ClientApp's router reaches a client
only through the typed client protocol."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flwr.serverapp.strategy import FedAvg

from fedsim.core import registry
from fedsim.core.registry import FamilyError
from fedsim.engine.host import cli
from fedsim.engine.server import resume_checkpoint
from fedsim.protocol import contract


class Counting(FedAvg):
    """A strategy with state: the rounds it aggregated."""

    def __init__(self) -> None:
        super().__init__()
        self.rounds = 0

    def checkpoint_state(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def restore_state(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])


class Wrapper:
    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy


def test_a_family_must_declare_the_server_state_its_strategy_keeps() -> None:
    fedavg = registry.family("fedavg")
    contract.check_server_state(fedavg, FedAvg())
    with pytest.raises(FamilyError, match="declare server_state=True"):
        contract.check_server_state(fedavg, Wrapper(Counting()))
    stateful = replace(fedavg, server_state=True)
    contract.check_server_state(stateful, Wrapper(Counting()))
    with pytest.raises(FamilyError, match="defines no checkpoint_state"):
        contract.check_server_state(stateful, FedAvg())


def test_the_checkpoint_saves_every_stateful_strategy_of_the_chain() -> None:
    inner = Counting()
    inner.rounds = 4
    saved = resume_checkpoint.unpack(resume_checkpoint.pack(resume_checkpoint.strategy_state(inner)))
    fresh = Counting()
    resume_checkpoint.restore_strategy(Wrapper(fresh), saved)
    assert fresh.rounds == 4
    with pytest.raises(ValueError, match="the strategy is"):
        resume_checkpoint.restore_strategy(FedAvg(), saved)


def test_the_router_reaches_clients_through_the_client_protocol() -> None:
    fedavg = registry.family("fedavg")

    class NoTrain:
        def evaluate(self, *args: Any, **kwargs: Any) -> Any: ...

    with pytest.raises(FamilyError, match="must define train"):
        contract.client_method(NoTrain(), fedavg, "evaluate")

    class TrainOnly:
        def train(self, *args: Any, **kwargs: Any) -> Any: ...

    with pytest.raises(FamilyError, match="has no method 'evaluate'"):
        contract.client_method(TrainOnly(), fedavg, "evaluate")

    class Client(TrainOnly, NoTrain):
        pass

    assert contract.client_method(Client(), fedavg, "evaluate").__name__ == "evaluate"
    with pytest.raises(FamilyError, match="has no method 'ping'"):
        contract.client_method(Client(), replace(fedavg, actions=("ping",)), "ping")


def test_a_family_that_cannot_resume_refuses_resume_with_its_reason(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.test_faults import failed_run, listing

    run_dir = failed_run(tmp_path)
    known = dict(registry.families())
    known["fedavg"] = replace(known["fedavg"], resume="its server keeps a stream")
    monkeypatch.setattr(registry, "families", lambda: known)
    before = listing(run_dir)
    assert cli.main(["run", "--resume", str(run_dir)]) == 2
    assert capsys.readouterr().err == (
        "fedsim: error: --resume: strategy 'fedavg': its server keeps a stream\n"
    )
    assert listing(run_dir) == before
