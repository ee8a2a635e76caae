"""``[audit]``: the privacy audit's keys (:class:`AuditConfig`), a section of
:class:`fedsim.core.experiment.Experiment`."""

from __future__ import annotations

from dataclasses import dataclass

from fedsim.core.schema import at_least, non_negative, one_of, option, positive

__all__ = ["AUDIT_ATTACKS", "AuditConfig"]


def _rounds_list(v: tuple[int, ...]) -> str | None:
    if not v:
        return "must name at least one round"
    return None if all(r >= 1 for r in v) else "every round must be >= 1"


def _batches(v: tuple[int, ...]) -> str | None:
    if not v:
        return "must name at least one batch"
    return None if all(b >= 0 for b in v) else "every batch must be >= 0"


#: The privacy audit's attacks (:data:`fedsim.audit.auditor.ATTACKS`).
AUDIT_ATTACKS = (
    "inverting-gradients",
    "analytic",
    "analytic-multistep",
    "inverting-activations",
)


def _attacks(v: tuple[str, ...]) -> str | None:
    if not v:
        return "must name at least one attack, or 'none'"
    if "none" in v:
        return None if v == ("none",) else "'none' cannot be listed with attacks"
    unknown = [a for a in v if a not in AUDIT_ATTACKS]
    if unknown:
        return f"has {unknown[0]!r}; choose from: none, {', '.join(AUDIT_ATTACKS)}"
    return None if len(set(v)) == len(v) else "names an attack twice"


@dataclass(frozen=True)
class AuditConfig:
    """``[audit]``: a privacy audit inside the run (off by default).

    After each round in ``rounds`` the server attacks what the first
    ``clients`` training clients (lowest partition ids) uploaded, with the
    family's view of the upload (``Family.audit``), with every attack in
    ``attack`` (a name or a list), and records per attack ``attack-psnr/<attack>``
    (dB, mean over the client's images matched one-to-one) and
    ``recovered/<attack>`` (images above ``recovered-db``), and their best over
    the attacks as ``attack-psnr`` and ``recovered``, in the round's ``train``
    rows; PNG grids go to ``attacks/``. Training is not changed. Each attack
    must fit the family's upload: ``inverting-gradients``, ``analytic``,
    ``analytic-multistep`` for weights, ``inverting-activations`` for split
    learning's cut activations (which ignores ``labels``).
    """

    attack: tuple[str, ...] = option(
        ["none"],
        "attacks: 'none' (off), or one or a list of 'inverting-gradients' (Geiping "
        "et al. 2020), 'analytic' (bias/weight ratio of one local step; Phong et "
        "al. 2017), 'analytic-multistep' (several SGD steps), "
        "'inverting-activations' (split learning's cut activations)",
        _attacks,
    )
    rounds: tuple[int, ...] = option(
        [1], "rounds whose uploads are attacked", _rounds_list
    )
    clients: int = option(
        1, "training clients attacked per round (lowest partition ids)", at_least(1)
    )
    iterations: int = option(
        4800,
        "optimisation steps of the inverting attacks (inversefed's 4,800)",
        at_least(1),
    )
    lr: float = option(0.1, "Adam learning rate of the dummy inputs", positive)
    tv: float = option(1e-4, "weight of the total-variation image prior", non_negative)
    labels: str = option(
        "known",
        "'known': the attacker is granted the labels; 'inferred': from the output "
        "bias update, else optimised with the inputs",
        one_of("known", "inferred"),
    )
    recovered_db: float = option(
        30.0, "PSNR (dB) above which a matched image counts as recovered", positive
    )
    batches: tuple[int, ...] = option(
        [0],
        "split learning: which batches' cut activations are inverted (0: the "
        "first, inverted against the head the server sent)",
        _batches,
    )

    @property
    def enabled(self) -> bool:
        """Whether any attack runs."""
        return self.attack != ("none",)
