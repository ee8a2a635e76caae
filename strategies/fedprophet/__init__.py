"""FedProphet: Tang et al., "FedProphet: Memory-Efficient Federated Adversarial
Training via Robust and Consistent Cascade Learning" (MLSys 2025); reference
code github.com/Yoruko-Tang/FedProphet.

Client ``i`` has a memory budget ``strategy.memory-mb[i mod len]``
(:mod:`fedsim.core.capacity`'s ``i mod len`` rule). The model is split into
atoms (a ``Linear`` / ``Conv2d`` layer with what follows it) and partitioned
greedily into cascaded modules that fit the smallest budget, counting
parameters (with gradients and momentum), activations, and an auxiliary head
on each module's output (:mod:`fedsim.learn.cascade`, the reference's
``model_partition``; heads pool feature maps to ``ceil(sqrt(classes /
channels))`` per side as the reference does). Training runs in stages, one
module per stage:

- Clients train the stage's module with its auxiliary head on the stage loss
  ``CE(aux(z)) + mu/2 * ||z||^2 / B`` (``strategy.mu``), on PGD examples of the
  stage's input (L-inf, radius from the server, 10 steps of ``2.5 eps / 10``,
  ``strategy.steps``), for ``strategy.local-iterations`` batches (local steps
  counted in iterations). The stage's inputs (the frozen earlier modules'
  output on the client's data) are computed once per stage and cached in the
  client process.
- Differentiated Module Assignment: a client whose budget holds more than the
  stage's module also trains the next modules that fit ("prophet" modules) with
  the last one's auxiliary head; its loss is ``(1 - psi) * stage loss + psi *
  prophet loss`` (``strategy.psi``).
- The server averages each array over the clients that trained it (masked,
  example-weighted, :func:`fedsim.strategies.fedprophet.maths.masked_average`),
  auxiliary heads included.
- Stage coordination: each stage gets ``ceil(rounds / modules)`` rounds and
  ends early when its score (clean accuracy + the previous stage's clean/robust
  ratio x robust accuracy, from the clients' evaluation of the model up to the
  stage with its head) has not improved for ``strategy.patience`` rounds.
- At a stage's end every client measures how far adversarial inputs move the
  finished module's output (custom action ``train.perturbation``): PGD at the
  stage's radius times the ``alpha`` of the stage's best score, maximising the
  feature distance ``sum_b ||m(x'_b) - m(x_b)||^2 / B`` (the reference's
  ``feature_adv_loss`` in ``moduleclient.py``;
  :func:`fedsim.learn.robust.feature_pgd`), then the mean L2 norm of
  ``m(x') - m(x)``; the next stage's radius is ``sqrt(mean^2 / dim)`` (the
  reference's ``int_adv_norm = inf``), scaled by ``alpha``, which starts at
  ``strategy.eps-quantile``.
- Adaptive Perturbation Adjustment on the reference's schedule
  (:func:`fedsim.strategies.fedprophet.maths.apa_due`): in a later stage,
  after its ``k``-th round with ``k > int(0.05 R)`` and ``k`` a multiple of
  ``int(0.1 R)`` (``R``: rounds per stage), ``alpha`` goes up by 0.1 when the
  mean clean/robust accuracy ratio of the last five evaluations exceeds 1.05 x
  the previous stage's, down by 0.1 (not below ``eps-quantile``) when it is
  under 0.95 x.

Evaluation (personalised data, shared model): each client evaluates the
modules up to the stage with the stage's head (the full model at the last
stage): clean accuracy and, with ``robust.epsilon`` > 0, input-space PGD
accuracy (:mod:`fedsim.learn.robust`). With one module (a budget that holds
the whole model) FedProphet is FedAvg with end-to-end PGD adversarial training,
the baseline the paper compares against.

Deviations from the reference code:

- Memory is counted from shapes (float32, SGD momentum: one buffer), not
  profiled; DMA checks memory only (the reference also bounds FLOPs by the
  slowest sampled client's time).
- Training PGD attacks the stage's cross-entropy on its head (the reference
  attacks the whole stage loss: the ``mu`` term, 1e-6 by default, and the
  prophet loss); the input-space radius of stage 1 is ``strategy.epsilon``.
- APA's period is at least one round (the reference's ``int(0.1 R)`` is 0,
  and its modulo fails, below 10 rounds a stage). The stage ends after
  ``strategy.patience`` rounds without improvement (the reference:
  ``int(0.1 R)``), and every evaluation counts (the reference skips the
  first ``int(0.05 R)`` rounds of a stage when tracking the best score).
- At a stage's end the reference restores the stage's best model; here the
  last one is kept. No warm-up rounds without adversarial training, no
  learning-rate decay per stage.

Message contract (keys from :mod:`fedsim.core.messages` and
:mod:`fedsim.learn.cascade`):

- ``train`` down: ``arrays`` (parameters of modules ``0..stage + prophets``
  and the heads ``aux.<stage>.*`` / ``aux.<last>.*``), ``config``
  (``server-round``, ``stage``, ``prophets``, ``epsilon``, ``bounded``).
- ``train`` up: ``arrays`` (the trained modules' parameters and heads),
  ``metrics`` (``loss``, ``num-examples``, ``stage``, ``prophets``,
  ``params``, ``memory-mb``).
- ``evaluate`` down: ``arrays`` (modules ``0..stage``, head ``aux.<stage>.*``),
  ``config``; up: ``metrics`` (``loss``, ``accuracy``, ``num-examples``;
  ``robust-loss``, ``robust-accuracy``).
- ``train.perturbation`` down: as ``evaluate``; up: ``metrics``
  (``perturbation``, ``feature-dim``, ``feature-min``).
"""

from dataclasses import dataclass

from fedsim.core.family import Family
from fedsim.core.schema import at_least, non_negative, option, positive, unit_interval


def _budgets(v: tuple[float, ...]) -> str | None:
    if not v:
        return "must name at least one budget"
    return None if all(b > 0 for b in v) else "every budget must be > 0"


@dataclass(frozen=True)
class Options:
    """FedProphet's keys (defaults: the reference's ``utils/options.py``)."""

    memory_mb: tuple[float, ...] = option(
        [1.0, 0.7, 0.45],
        "training-memory budget of each client in MB: client i gets entry i mod len",
        _budgets,
    )
    epsilon: float = option(
        0.1, "L-inf PGD radius of adversarial training on the inputs", non_negative
    )
    steps: int = option(10, "PGD steps of adversarial training", at_least(1))
    mu: float = option(1e-6, "strong-convexity weight of the stage loss", non_negative)
    psi: float = option(1.0, "weight of the prophet modules' loss (DMA)", unit_interval)
    eps_quantile: float = option(
        0.3, "initial (and lowest) scale of a stage's measured epsilon", positive
    )
    patience: int = option(
        3, "rounds without improvement that end a stage early", at_least(1)
    )
    local_iterations: int = option(30, "local steps (batches) per round", at_least(1))


FAMILY = Family(
    name="fedprophet",
    summary="FedProphet (Tang et al., 2025): memory-bounded cascaded modules, "
    "PGD stage training, APA and DMA, masked averaging",
    server="fedsim.strategies.fedprophet.server:build",
    client="fedsim.clients.fedprophet:FedProphetClient",
    options=Options,
    global_model=False,
    server_state=True,
    actions=("perturbation",),
    check="fedsim.learn.cascade:check_budget",
)
