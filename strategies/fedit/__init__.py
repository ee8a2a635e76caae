"""FedIT: Zhang et al., "Towards Building the Federated GPT: Federated Instruction
Tuning" (ICASSP 2024), the FedAvg-of-adapters baseline of the FLoRA paper.

FedIT averages LoRA's A and B separately. The applied update is then
(sum_k p_k s_k B_k)(sum_k p_k A_k), not the clients' sum_k p_k s_k B_k A_k: it
carries cross terms B_j A_k (j != k) and wrong weights ("aggregation noise"), and
clients of different ranks only combine after zero-padding to the largest rank
(HetLoRA-style), which makes it worse. The round is otherwise FLoRA's
(:class:`fedsim.strategies.flora.server.FLoRA`): the averaged update is merged into the global
model, fully trained modules are averaged by example counts, clients start fresh
adapters on the merged model; only :meth:`FedIT.combine` differs. As every client
of a round draws the same initial A (:func:`fedsim.learn.lora.inject_lora`), its rows
line up across clients, as they do when FedIT clients receive a common adapter.

Message contract: exactly FLoRA's (see :mod:`fedsim.strategies.flora`), including the
server-side ``aggregation-error`` (here > 0: the noise the averaging adds).
"""

from fedsim.core.family import Family
from fedsim.strategies.fedit.maths import average_lora

__all__ = ["FAMILY", "average_lora"]

FAMILY = Family(
    name="fedit",
    summary="FedIT (Zhang et al., 2024): averages LoRA A and B separately "
    "(zero-padded ranks)",
    server="fedsim.strategies.fedit.server:build",
    client="fedsim.clients.lora:LoraClient",
    peft=("lora",),
    privacy=("none", "dp-sgd"),
    rejects={
        "dp-fedavg": "it exchanges LoRA adapters while the server keeps the whole "
        "model, so the update Flower's wrapper clips is not what the server "
        "releases"
    },
    check="fedsim.learn.lora:check_layout",
    audit="fedsim.audit.replay:lora_factors",
)
