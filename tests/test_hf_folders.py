"""Datasets as researchers keep them: save_to_disk folders (Dataset and
DatasetDict), a dataset's config (data.subset) and its own test split
(data.test-split), the FEMNIST-shaped generator, and bad input -> exit 2."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import DataConfig
from fedsim.engine.host.cli import main
from fedsim.learn import femnist_like
from fedsim.learn.data import _split, federated_data, load_arrays

WRITERS = 24


@pytest.fixture(scope="module")
def femnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small FEMNIST-shaped DatasetDict folder (train and test splits)."""
    folder = tmp_path_factory.mktemp("femnist") / "femnist"
    return femnist_like.write(folder, writers=WRITERS, mean_rows=12, classes=6)


def femnist_cfg(folder: Path, **changes: object) -> DataConfig:
    values: dict[str, object] = {
        "dataset": f"hf:{folder}",
        "label_column": "character",
        "partitioner": "natural-id",
        "partition_by": "writer_id",
    }
    return DataConfig(**{**values, **changes})  # type: ignore[arg-type]


def test_generator_is_femnist_shaped(femnist: Path) -> None:
    import datasets

    saved = datasets.load_from_disk(str(femnist))
    assert set(saved) == {"train", "test"}
    train = saved["train"]
    assert isinstance(train.features["image"], datasets.Image)
    assert train.features["character"].num_classes == 6
    counts = pd.Series(train["writer_id"]).value_counts()
    assert len(counts) == WRITERS and counts.max() > 2 * counts.min()  # skewed
    assert np.asarray(train[0]["image"]).shape == (28, 28)
    # seeded: the same arguments give the same sizes; another seed others
    sizes = femnist_like.writer_sizes(50, 20, seed=1)
    assert np.array_equal(sizes, femnist_like.writer_sizes(50, 20, seed=1))
    assert not np.array_equal(sizes, femnist_like.writer_sizes(50, 20, seed=2))


def test_dataset_dict_folder_and_its_own_test_split(femnist: Path) -> None:
    import datasets

    saved = datasets.load_from_disk(str(femnist))
    arrays, info = load_arrays(femnist_cfg(femnist), 0)
    assert info == type(info)((1, 28, 28), 6)
    pixels = np.stack([np.asarray(im) for im in saved["train"]["image"]])
    np.testing.assert_array_equal(arrays.x[:, 0], pixels / np.float32(255.0))
    assert arrays.y.tolist() == saved["train"]["character"]
    assert arrays.ids.tolist() == saved["train"]["writer_id"]  # never a feature
    data = _split(femnist_cfg(femnist, test_split="test"), WRITERS, 0)
    # the pool is the whole train split, the global test set the test split
    assert len(data.pool) == len(arrays) and len(data.test) == len(saved["test"])
    assert data.test.y.tolist() == saved["test"]["character"]


def test_labels_are_encoded_over_both_splits(tmp_path: Path) -> None:
    """A class missing from the train split keeps its index in the test split."""
    import datasets

    train = {"f": [0.0, 1.0, 2.0, 3.0], "label": ["b", "c", "b", "c"]}
    test = {"f": [4.0, 5.0], "label": ["a", "c"]}
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict(train), test=datasets.Dataset.from_dict(test)
    ).save_to_disk(str(tmp_path / "d"))
    cfg = DataConfig(
        dataset=f"hf:{tmp_path / 'd'}", test_split="test", partitioner="iid"
    )
    data = _split(cfg, 2, 0)
    assert data.info.num_classes == 3
    assert data.pool.y.tolist() == [1, 2, 1, 2] and data.test.y.tolist() == [0, 2]


def test_single_dataset_folder_loads(tmp_path: Path) -> None:
    import datasets

    frame = pd.DataFrame({"f1": np.arange(30.0), "label": np.arange(30) % 3})
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "one"))
    arrays, info = load_arrays(DataConfig(dataset=f"hf:{tmp_path / 'one'}"), 0)
    assert info.input_shape == (1,) and info.num_classes == 3
    np.testing.assert_array_equal(arrays.x[:, 0], frame["f1"].to_numpy())


def configs_folder(root: Path) -> Path:
    """A local dataset with two configs (README ``configs:``), as on the hub."""
    for name, classes in (("small", 2), ("large", 3)):
        (root / name).mkdir(parents=True)
        frame = pd.DataFrame({"f": np.arange(12.0), "label": np.arange(12) % classes})
        frame.to_parquet(root / name / "train.parquet")
    entries = "".join(
        f"- config_name: {n}\n  data_files:\n  - split: train\n"
        f"    path: {n}/*.parquet\n"
        for n in ("small", "large")
    )
    (root / "README.md").write_text(f"---\nconfigs:\n{entries}---\n")
    return root


def test_subset_chooses_the_config(tmp_path: Path) -> None:
    root = configs_folder(tmp_path / "configs")
    for subset, classes in (("small", 2), ("large", 3)):
        cfg = DataConfig(dataset=f"hf:{root}", subset=subset)
        assert load_arrays(cfg, 0)[1].num_classes == classes


def test_memory_mapped_partitions_equal_the_arrays_built_in_memory(
    femnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    cfg = femnist_cfg(femnist, test_split="test")
    built = _split(cfg, 8, 0)
    mapped = federated_data.__wrapped__(cfg, 8, 0)
    assert isinstance(mapped.pool.x, np.memmap)
    for pid in range(8):
        a, b = built.client(pid), mapped.client(pid)
        for got, want in ((b.train, a.train), (b.test, a.test)):
            assert type(got.x) is np.ndarray and got.x.flags.writeable
            np.testing.assert_array_equal(got.x, want.x)
            np.testing.assert_array_equal(got.y, want.y)
    np.testing.assert_array_equal(mapped.test.x, built.test.x)


def _sets(*pairs: str) -> list[str]:
    return ["run", *[arg for pair in pairs for arg in ("--set", pair)]]


def _femnist_run(*pairs: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, folder: _sets(
        f"data.dataset=hf:{folder}",
        "data.label-column=character",
        "model.name=mlp",
        "federation.clients=4",
        *pairs,
    )


#: (case, arguments, text the one-line error must hold)
BAD: list[tuple[str, Callable[[Path, Path], list[str]], str]] = [
    (
        "folder",
        lambda tmp, folder: _sets(f"data.dataset=hf:{tmp / 'nothing-here'}"),
        "data.dataset: cannot load",
    ),
    ("split", _femnist_run("data.split=validation"), "data.split: 'validation' is"),
    ("test-split", _femnist_run("data.test-split=dev"), "data.test-split: 'dev' is"),
    (
        "subset-on-folder",
        _femnist_run("data.subset=digits"),
        "data.subset: ",
    ),
    (
        "subset",
        lambda tmp, folder: _sets(
            f"data.dataset=hf:{configs_folder(tmp / 'c')}",
            "data.subset=medium",
            "model.name=mlp",
        ),
        "data.subset: 'medium' is not a config",
    ),
    ("label-column", _femnist_run("data.label-column=glyph"), "data.label-column:"),
    (
        "partition-by",
        _femnist_run("data.partitioner=natural-id", "data.partition-by=author"),
        "data.partition-by: 'author' is not a column",
    ),
    (
        "too-many-clients",
        _femnist_run(
            "data.partitioner=natural-id",
            "data.partition-by=writer_id",
            "federation.clients=30",
        ),
        "federation.clients: 30 exceeds the 24 distinct values",
    ),
    (
        "partitioner-args-unknown",
        _femnist_run("data.partitioner=shard", "data.partitioner-args.shards=2"),
        "data.partitioner-args: 'shards' is not an argument of ShardPartitioner",
    ),
    (
        "partitioner-args-missing",
        _femnist_run("data.partitioner=inner-dirichlet", "data.partitioner-args={}"),
        "data.partitioner-args: InnerDirichletPartitioner needs partition_sizes",
    ),
    (
        "partitioner-args-rejected",
        _femnist_run(
            "data.partitioner=size", "data.partitioner-args.partition_sizes=[1,2]"
        ),
        "federation.clients: 4, but SizePartitioner",
    ),
    (
        "partitioner-args-on-dirichlet",
        _femnist_run("data.partitioner-args.alpha=1"),
        "data.partitioner-args: data.partitioner = 'dirichlet' is set by",
    ),
    (
        "partition-by-with-dirichlet",
        _femnist_run("data.partition-by=writer_id"),
        "data.partition-by: data.partitioner = 'dirichlet' partitions by the label",
    ),
    (
        "natural-id-without-column",
        _femnist_run("data.partitioner=natural-id"),
        "data.partition-by: required",
    ),
]


@pytest.mark.parametrize(
    ("setup", "message"), [pytest.param(s, m, id=c) for c, s, m in BAD]
)
def test_bad_data_input_exits_2_with_one_line_and_writes_nothing(
    setup: Callable[[Path, Path], list[str]],
    message: str,
    femnist: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    args = setup(tmp_path, femnist) + ["--out", str(tmp_path / "runs")]
    before = sorted(tmp_path.rglob("*"))
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsim: error: "), captured.err
    assert message in lines[0]
    assert sorted(tmp_path.rglob("*")) == before


def test_test_split_needs_a_hugging_face_dataset() -> None:
    from fedsim.core.loading import load_experiment

    with pytest.raises(ConfigError, match="data.test-split: only a Hugging Face"):
        load_experiment(None, ["data.test-split=test"])
