"""The ping family's client: FedAvg's, plus the ``ping`` action."""

from typing import Any

from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedsim.clients.full import FullModelClient
from fedsim.core.messages import ARRAYS, METRICS


class PingClient(FullModelClient):
    def ping(self, content: RecordDict, data: Any, **_: Any) -> RecordDict:
        n = content[ARRAYS]["n"].numpy()
        factor = self.experiment.strategy.options.factor
        return RecordDict(
            {
                ARRAYS: ArrayRecord({"n": Array(n * factor)}),
                METRICS: MetricRecord({"pings": 1.0}),
            }
        )
