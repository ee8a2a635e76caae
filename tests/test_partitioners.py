"""Natural-id partitions and every other flwr-datasets row partitioner, against
the ids' own rows and the partitioners' own output; data.partitioner-args as a
table through TOML, --set and Flower's run-config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import DataConfig
from fedsim.core.loading import (
    from_run_config,
    load_experiment,
    to_run_config,
    to_toml,
)
from fedsim.core.schema import Table
from fedsim.learn.partitioners import group_ids, partition_indices


def writers(n_ids: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and string writer ids with skewed counts, rows interleaved."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 30, size=n_ids)
    ids = rng.permutation(np.repeat([f"w{i:03d}" for i in range(n_ids)], sizes))
    return rng.integers(0, 5, size=len(ids)), ids


NATURAL = DataConfig(partitioner="natural-id", partition_by="writer")


def test_one_client_per_id_holds_exactly_that_ids_rows() -> None:
    import datasets
    from flwr_datasets.partitioner import NaturalIdPartitioner

    labels, ids = writers()
    parts = partition_indices(labels, NATURAL, 40, seed=0, ids=ids)
    oracle = NaturalIdPartitioner(partition_by="writer")
    oracle.dataset = datasets.Dataset.from_dict({"writer": ids, "row": range(len(ids))})
    for pid, value in enumerate(sorted(set(ids))):  # flwr-datasets: sorted ids
        np.testing.assert_array_equal(parts[pid], np.flatnonzero(ids == value))
        np.testing.assert_array_equal(parts[pid], oracle.load_partition(pid)["row"])


def test_fewer_clients_group_whole_ids_seeded_and_balanced() -> None:
    labels, ids = writers()
    sizes = {v: int((ids == v).sum()) for v in set(ids)}
    for clients in (3, 7, 39):
        parts = partition_indices(labels, NATURAL, clients, seed=4, ids=ids)
        assert len(parts) == clients
        joined = np.concatenate(parts)
        assert np.array_equal(np.sort(joined), np.arange(len(ids)))  # exactly once
        owners = [set(ids[p]) for p in parts]
        for a, group in enumerate(owners):  # each id wholly inside one client
            assert group and all((ids[parts[a]] == v).sum() == sizes[v] for v in group)
        rows = [len(p) for p in parts]
        # greedy to the emptiest client: the spread is at most one id's rows
        assert max(rows) - min(rows) <= max(sizes.values())
    again = partition_indices(labels, NATURAL, 7, seed=4, ids=ids)
    other = partition_indices(labels, NATURAL, 7, seed=5, ids=ids)
    first = partition_indices(labels, NATURAL, 7, seed=4, ids=ids)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_grouping_is_as_even_as_the_ids_allow() -> None:
    # ids of 5, 4, 3, 3, 3, 2 rows into 2 groups: 10 and 10 is reachable
    groups = group_ids([5, 4, 3, 3, 3, 2], 2, seed=0)
    totals = sorted(sum([5, 4, 3, 3, 3, 2][i] for i in g) for g in groups)
    assert totals == [10, 10]
    assert sorted(np.concatenate(groups).tolist()) == list(range(6))
    # one giant id: the others gather in the second group
    assert sorted(len(g) for g in group_ids([100, 1, 1, 1], 2, seed=3)) == [1, 3]


def test_more_clients_than_ids_is_an_input_error() -> None:
    labels, ids = writers(5)
    with pytest.raises(ConfigError, match="federation.clients: 6 exceeds the 5"):
        partition_indices(labels, NATURAL, 6, seed=0, ids=ids)


#: name -> (flwr-datasets class, data.partitioner-args, by a column of its own)
OTHERS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "shard": ("ShardPartitioner", {"num_shards_per_partition": 3}, False),
    "inner-dirichlet": (
        "InnerDirichletPartitioner",
        {"partition_sizes": [100, 150, 200, 150], "alpha": 0.3},
        False,
    ),
    "size": ("SizePartitioner", {"partition_sizes": [50, 150, 300, 90]}, False),
    "linear": ("LinearPartitioner", {}, False),
    "square": ("SquarePartitioner", {}, False),
    "exponential": ("ExponentialPartitioner", {}, False),
    "continuous": ("ContinuousPartitioner", {"strictness": 0.5}, True),
    "distribution": (
        "DistributionPartitioner",
        {
            "distribution_array": np.arange(1.0, 9.0).reshape(4, 2).tolist(),
            "num_unique_labels_per_partition": 2,
            "preassigned_num_samples_per_label": 2,
        },
        False,
    ),
    "grouped-natural-id": ("GroupedNaturalIdPartitioner", {"group_size": 10}, True),
}


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_each_partitioner_gives_its_own_output(name: str) -> None:
    import datasets
    from flwr_datasets import partitioner as fp

    cls_name, args, own_column = OTHERS[name]
    labels, ids = writers(60, seed=1)
    labels, ids = labels[:600], ids[:600]
    if name == "distribution":  # as many labels as clients (its own rule)
        labels = labels % 4
    column: np.ndarray = ids
    if name == "continuous":
        column = np.random.default_rng(2).normal(size=600)
    if name == "grouped-natural-id":
        column = np.asarray([f"w{i % 40:02d}" for i in range(600)])
    cfg = DataConfig(
        partitioner=name,
        partition_by="writer" if own_column else "",
        partitioner_args=Table(args),
    )
    parts = partition_indices(
        labels, cfg, 4, seed=7, ids=column if own_column else None
    )
    # the oracle: the partitioner itself on the same shuffled table, as
    # FederatedDataset(shuffle=True, seed=7) hands it
    table = {"label": labels, "row": np.arange(600)}
    if own_column:
        table["id"] = column
    by = "id" if own_column else "label"
    kwargs = {**args, "partition_by": by, "seed": 7, "num_partitions": 4}
    if name == "distribution":  # it takes a numpy array only; TOML gives lists
        kwargs["distribution_array"] = np.asarray(args["distribution_array"])
    cls = getattr(fp, cls_name)
    import inspect

    accepted = inspect.signature(cls).parameters
    oracle = cls(**{k: v for k, v in kwargs.items() if k in accepted})
    oracle.dataset = datasets.Dataset.from_dict(table).shuffle(seed=7)
    want = [oracle.load_partition(i)["row"] for i in range(oracle.num_partitions)]
    assert len(parts) == len(want) == 4
    for got, expected in zip(parts, want, strict=True):
        np.testing.assert_array_equal(got, expected)


class Lopsided:
    """A partitioner that gives every row to client 0."""

    def __init__(self, num_partitions: int) -> None:
        self.num_partitions = num_partitions
        self.dataset: Any = None

    def load_partition(self, partition_id: int) -> Any:
        return self.dataset.select(
            range(len(self.dataset)) if partition_id == 0 else []
        )


def test_an_empty_client_is_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsim.core import registry

    entry = registry.Entry("tests.test_partitioners:Lopsided", "test")
    monkeypatch.setitem(registry.PARTITIONERS, "lopsided", entry)  # type: ignore[index]
    labels, _ = writers()
    cfg = DataConfig(partitioner="lopsided")
    with pytest.raises(ConfigError, match="Lopsided leaves client 1 without rows"):
        partition_indices(labels, cfg, 3, seed=0)


def test_partitioner_args_travel_as_a_table(tmp_path: Path) -> None:
    file = tmp_path / "e.toml"
    file.write_text(
        '[data]\npartitioner = "size"\n'
        "[data.partitioner-args]\npartition_sizes = [10, 20]\n"
        "[federation]\nclients = 2\n"
    )
    exp = load_experiment(file)
    assert exp.data.partitioner_args == Table({"partition_sizes": [10, 20]})
    assert exp.data.partitioner_args.plain() == {"partition_sizes": [10, 20]}
    hash(exp.data)  # frozen configs stay hashable (the data cache keys on them)
    again = load_experiment(file, ["data.partitioner-args.partition_sizes=[5, 25]"])
    assert again.data.partitioner_args["partition_sizes"] == (5, 25)
    whole = load_experiment(file, ["data.partitioner-args={partition_sizes=[1,2]}"])
    assert whole.data.partitioner_args["partition_sizes"] == (1, 2)
    assert from_run_config(to_run_config(exp)) == exp
    written = tmp_path / "resolved.toml"
    written.write_text(to_toml(exp))
    assert load_experiment(written) == exp
    with pytest.raises(ConfigError, match="data.partitioner-args: expected a table"):
        load_experiment(file, ["data.partitioner-args=3"])
