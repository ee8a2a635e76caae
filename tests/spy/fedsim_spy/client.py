"""The spy's client: HyperFL's, writing its private arrays after each round."""

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import RecordDict

from fedsim.clients.hyperfl import HyperFLClient


class SpyClient(HyperFLClient):
    def train(self, content: RecordDict, data: Any, **kwargs: Any) -> RecordDict:
        reply = super().train(content, data, **kwargs)
        private = {f"private|{k}": v.numpy() for k, v in self.private_arrays().items()}
        generated = {
            f"generated|{k}": v.detach().cpu().numpy()
            for k, v in self.model.generate().items()
        }
        name = f"private-{kwargs['server_round']}-{data.partition_id}.npz"
        np.savez(Path(self.options.spy_dir) / name, **private, **generated)
        return reply
