"""Loading an experiment: TOML file and overrides -> validated frozen config.

Errors are :class:`fedsim.core.errors.ConfigError` with a one-line message that
names the dotted key and what is allowed. Which keys exist depends on the
family (``strategy.name``): its option table adds ``<section>.<key>`` keys
(``Family.section``: ``strategy`` unless the family names a table of its own),
and its declaration says which ``peft.method`` and ``privacy.mechanism`` it
runs.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w

from fedsim.core import registry
from fedsim.core.errors import ConfigError
from fedsim.core.experiment import (
    DataConfig,
    Experiment,
    StrategyConfig,
    expected_clients_per_round,
)
from fedsim.core.family import Family, load
from fedsim.core.ignored import check_ignored
from fedsim.core.schema import (
    Schema,
    Table,
    as_table,
    build,
    checked,
    flatten,
    kebab,
    keys_of,
    regroup,
    shown_default,
    unknown_key,
)

RunConfig = dict[str, bool | int | float | str]

#: Run-config key (outside the experiment schema) carrying the run directory.
RUN_DIR_KEY = "run-dir"
#: Run-config key of a sweep: JSON list of ``{"config": run-config, "run-dir": ...}``
#: whose experiments one Flower run executes one after another.
SWEEP_KEY = "sweep"
#: Run-config key (outside the experiment schema): true when the run continues
#: from the run directory's checkpoint (``fedsim run --resume``).
RESUME_KEY = "resume"
#: Run-config key set by fedsim's simulation runner: the nodes are virtual and
#: interchangeable, the server assigns each its partition (no discovery query).
ASSIGN_KEY = "assign-partitions"
#: Run-config keys that are not experiment keys.
RUNTIME_KEYS = (RUN_DIR_KEY, ASSIGN_KEY, RESUME_KEY)
_NAME_KEY = "strategy.name"


def option_keys(family: Family) -> Schema:
    """The keys of ``family``'s option table, ``<section>.<key>``."""
    if family.section != "strategy" and any(
        k.startswith(f"{family.section}.") for k in keys_of(Experiment)
    ):
        raise ValueError(
            f"family {family.name!r}: section {family.section!r} is an experiment "
            "section; name a table of the family's own"
        )
    return keys_of(family.options, f"{family.section}.")


def schema(strategy: str | None = None) -> Schema:
    """Every dotted key with its type and declaration: the experiment's keys,
    plus the option keys of the family ``strategy`` when given."""
    keys = keys_of(Experiment)
    if strategy is not None:
        keys.update(option_keys(registry.family(strategy)))
    return keys


def _family_of(values: Mapping[str, Any]) -> Family:
    base = keys_of(Experiment)
    tp, declared = base[_NAME_KEY]
    name = checked(_NAME_KEY, tp, declared, values.get(_NAME_KEY, declared.default))
    return registry.family(name)


def from_flat(values: Mapping[str, Any]) -> Experiment:
    """Validate flat dotted keys and build the frozen :class:`Experiment`."""
    family = _family_of(values)
    keys = schema(family.name)
    values = regroup(values, keys)
    good: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in keys:
            raise unknown_key(key, keys)
        tp, declared = keys[key]
        good[key] = checked(key, tp, declared, raw)
    options = build(family.options, good, f"{family.section}.")
    strategy = StrategyConfig(name=family.name, options=options)
    own = option_keys(family)
    plain = {k: v for k, v in good.items() if k not in own and k != _NAME_KEY}
    exp = dataclasses.replace(build(Experiment, plain), strategy=strategy)
    check_consistency(exp, family)
    return exp


#: Data keys that decide which examples form the global test set.
_SPLIT_KEYS = ("test_fraction", "size", "classes", "features")


def check_consistency(exp: Experiment, family: Family) -> None:
    """Rules across keys, and the family's capabilities (ConfigError)."""
    fed = exp.federation
    if fed.min_replies > fed.clients:
        raise ConfigError(
            f"federation.min-replies: {fed.min_replies} must be <= federation.clients"
            f" ({fed.clients})"
        )
    if exp.data.dataset == "file" and not exp.data.path:
        raise ConfigError("data.path: required when data.dataset = 'file'")
    _check_data(exp.data)
    if exp.model.hidden % exp.model.heads and exp.model.name == "vit":
        raise ConfigError(
            f"model.heads: {exp.model.heads} must divide model.hidden "
            f"({exp.model.hidden})"
        )
    if exp.peft.method == "lora" and not exp.peft.targets:
        raise ConfigError("peft.targets: LoRA needs at least one module name")
    _check_pretrain_split(exp)
    check_ignored(exp)
    _check_model_data(exp)
    _check_family(exp, family)
    _check_audit(exp, family)
    p = exp.privacy
    if p.mechanism != "none" and p.noise_multiplier == 0 and p.target_epsilon == 0:
        raise ConfigError(
            f"privacy.noise-multiplier: 0 with no privacy.target-epsilon gives "
            f"{p.mechanism!r} no privacy; set noise-multiplier > 0 or "
            "target-epsilon > 0"
        )
    if p.client_sampling != "fixed" and p.mechanism != "dp-fedavg":
        raise ConfigError(
            f"privacy.client-sampling: {p.client_sampling!r} is implemented by "
            "privacy.mechanism = 'dp-fedavg' only; leave it 'fixed' with "
            f"privacy.mechanism = {p.mechanism!r}"
        )
    if p.mechanism == "dp-fedavg" and p.clipping == "adaptive":
        sampled = expected_clients_per_round(exp)
        stddev = p.clipped_count_stddev or sampled / 20
        # centred bits b - 1/2 have sensitivity 1/2: the count's multiplier doubles
        centred = p.count_release == "centred"
        if p.noise_multiplier >= stddev * (2 if centred else 1):
            raise ConfigError(
                f"privacy.noise-multiplier: {p.noise_multiplier:g} must be < "
                f"clipped-count-stddev = {stddev:g}"
                f"{' / 1/2 (centred count)' if centred else ''} with adaptive "
                f"clipping ({sampled:g} clients per round); raise "
                "privacy.clipped-count-stddev"
            )


def _check_model_data(exp: Experiment) -> None:
    """The model's task and the kind of data agree."""
    model, data = exp.model, exp.data
    text = bool(data.format or data.text_column)
    if model.name == "hf" and not model.path:
        raise ConfigError("model.path: required when model.name = 'hf'")
    if text and model.name != "hf":
        raise ConfigError(
            "model.name: text rows (data.format / data.text-column) need "
            "model.name = 'hf', whose tokenizer tokenises them"
        )
    if model.name != "hf":
        return
    if model.task == "causal-lm" and not data.format:
        raise ConfigError(
            "data.format: model.task 'causal-lm' needs 'text', 'alpaca' or 'dolly'"
        )
    if model.task == "sequence-classification" and (data.format or not text):
        raise ConfigError(
            "data.text-column: model.task 'sequence-classification' needs the "
            "text column of labelled rows (and data.format = '')"
        )
    if model.task == "image-classification" and text:
        raise ConfigError(
            "model.task: 'image-classification' needs image data, not text rows"
        )


def _check_data(data: DataConfig) -> None:
    hf = data.dataset.startswith("hf:")
    for key in ("subset", "test_split"):
        if getattr(data, key) and not hf:
            raise ConfigError(
                f"data.{kebab(key)}: only a Hugging Face dataset (data.dataset = "
                f"'hf:NAME') has configs and splits; leave it empty for "
                f"data.dataset = {data.dataset!r}"
            )
    if data.test_split and data.test_split == data.split:
        raise ConfigError(
            f"data.test-split: {data.test_split!r} is data.split, the training "
            "split; name another split, or leave it empty to carve "
            "data.test-fraction out of data.split"
        )
    needs_column = ("natural-id", "grouped-natural-id", "continuous")
    if data.partitioner in needs_column and not data.partition_by:
        raise ConfigError(
            f"data.partition-by: required with data.partitioner = "
            f"{data.partitioner!r} (the column whose values partition the rows)"
        )
    label_only = ("iid", "dirichlet", "pathological")
    if data.partition_by and data.partitioner in label_only:
        raise ConfigError(
            f"data.partition-by: data.partitioner = {data.partitioner!r} partitions "
            "by the label only; leave data.partition-by empty or choose "
            "'natural-id' or another flwr-datasets partitioner"
        )
    if data.partitioner_args and data.partitioner in registry.OWN_KEYS_PARTITIONERS:
        raise ConfigError(
            f"data.partitioner-args: data.partitioner = {data.partitioner!r} is set "
            "by its own data.* keys; partitioner-args is for the other "
            "flwr-datasets partitioners (e.g. 'shard', 'size')"
        )


def _check_family(exp: Experiment, family: Family) -> None:
    method, name = exp.peft.method, family.name
    if method not in family.peft:
        allowed = " or ".join(repr(m) for m in family.peft)
        raise ConfigError(
            f"peft.method: {method!r} cannot run strategy.name = {name!r}, which "
            f"runs peft.method = {allowed}; set peft.method = {family.peft[0]!r} or "
            "choose another strategy.name"
        )
    mechanism = exp.privacy.mechanism
    if mechanism not in family.privacy:
        reason = family.rejects.get(mechanism, f"{name!r} does not support it")
        allowed = ", ".join(repr(m) for m in family.privacy)
        raise ConfigError(
            f"strategy.name: {name!r} cannot run under privacy.mechanism = "
            f"{mechanism!r}: {reason}; it supports privacy.mechanism = {allowed}"
        )


def _check_audit(exp: Experiment, family: Family) -> None:
    audit = exp.audit
    if not audit.enabled:
        return
    if not family.audit:
        raise ConfigError(
            f"audit.attack: strategy.name = {family.name!r} declares no view of its "
            "uploads to attack; set audit.attack = 'none'"
        )
    # the surface names the attacks it feeds
    fits: tuple[str, ...] = load(family.audit).attacks
    wrong = [a for a in audit.attack if a not in fits]
    if wrong:
        allowed = ", ".join(repr(a) for a in fits)
        raise ConfigError(
            f"audit.attack: {wrong[0]!r} does not fit what strategy.name = "
            f"{family.name!r} uploads; use audit.attack = {allowed}"
        )
    late = [r for r in audit.rounds if r > exp.rounds]
    if late:
        raise ConfigError(
            f"audit.rounds: round {late[0]} is after the last round ({exp.rounds})"
        )


def _check_pretrain_split(exp: Experiment) -> None:
    model, data = exp.model, exp.data
    if model.pretrain and model.pretrain == data.dataset:
        # The public split leaves out the global test set drawn with the default
        # data settings and the run's seed; other settings would leak test images
        # into pre-training.
        default = DataConfig()
        for key in _SPLIT_KEYS:
            if getattr(data, key) != getattr(default, key):
                raise ConfigError(
                    f"data.{kebab(key)}: must keep its default "
                    f"({getattr(default, key)!r}) when model.pretrain = "
                    f"{model.pretrain!r}, whose public split holds out the default "
                    "global test set"
                )


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``KEY=VALUE``; VALUE is read as TOML, else taken as a bare string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. rounds=5")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def packaged_quickstart() -> Path:
    """Path of the experiment ``fedsim run`` uses without an argument."""
    return Path(str(resources.files("fedsim") / "quickstart.toml"))


def read_toml(file: Path, what: str) -> dict[str, Any]:
    """The tables of TOML file ``file`` (``what`` names it in errors).

    Raises
    ------
    ConfigError
        One line: the file is missing, a directory, unreadable or not TOML.
    """
    if file.is_dir():
        raise ConfigError(f"{what} {file} is a directory; give a TOML file")
    if not file.is_file():
        raise ConfigError(f"{what} not found: {file}")
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{what} {file}: cannot read: {err.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        message = str(err).replace("\n", " ")
        raise ConfigError(f"{file}: invalid TOML: {message}") from None


def load_experiment(
    path: str | Path | None = None, overrides: Sequence[str] = ()
) -> Experiment:
    """Read an experiment file, apply ``KEY=VALUE`` overrides and validate it.

    Parameters
    ----------
    path : str or Path, optional
        Experiment TOML; the packaged quickstart when omitted.
    overrides : sequence of str
        ``KEY=VALUE`` strings with dotted keys (``data.alpha=0.1``).

    Raises
    ------
    ConfigError
        One-line message naming the key and what is allowed.
    """
    file = Path(path) if path is not None else packaged_quickstart()
    values = flatten(read_toml(file, "experiment file"))
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    return from_flat(values)


def to_dict(exp: Experiment) -> dict[str, Any]:
    """Nested dict with kebab-case keys, as in an experiment file (the family's
    options in its section)."""
    table = typing.cast(dict[str, Any], as_table(exp))
    section = registry.family(exp.strategy.name).section
    if section != "strategy":
        strategy = table["strategy"]
        moved = as_table(exp.strategy.options)
        table[section] = {k: strategy.pop(k) for k in moved}
    return table


def to_toml(exp: Experiment) -> str:
    """The fully resolved experiment as TOML text (scalars first, then tables)."""
    return tomli_w.dumps(to_dict(exp))


def to_run_config(exp: Experiment) -> RunConfig:
    """Flatten to Flower's run-config: dotted keys, lists and table-valued keys
    as JSON strings."""
    tables = [k for k, (tp, _) in schema(exp.strategy.name).items() if tp is Table]
    flat = flatten(to_dict(exp), keep=tables)
    return {
        k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flat.items()
    }


def from_run_config(run_config: Mapping[str, Any]) -> Experiment:
    """Rebuild the experiment from Flower's run-config (inverse of to_run_config)."""
    values = {k: v for k, v in run_config.items() if k not in RUNTIME_KEYS}
    keys = schema(_family_of(values).name)
    for key, value in values.items():
        tp = keys[key][0] if key in keys else None
        whole = tp is Table or typing.get_origin(tp) is tuple
        if tp is not None and whole and isinstance(value, str):
            values[key] = json.loads(value)
    return from_flat(values)


def reference(strategy: str | None = None) -> list[tuple[str, str, str]]:
    """(dotted key, default as TOML, help) for every experiment key, or for the
    option table of family ``strategy``; feeds the docs."""
    if strategy is None:
        keys = keys_of(Experiment)
    else:
        keys = option_keys(registry.family(strategy))
    return [(k, shown_default(f), f.metadata["help"]) for k, (_, f) in keys.items()]


def reference_markdown() -> str:
    """The experiment-file reference table of the docs, then one table per
    family that has options of its own."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, help_text in reference():
        lines.append(f"| `{key}` | `{default}` | {help_text} |")
    for name in sorted(registry.families()):
        rows = reference(name)
        if rows:
            lines += ["", f'Options of `strategy.name = "{name}"`:', ""]
            lines += ["| key | default | meaning |", "| --- | --- | --- |"]
            lines += [f"| `{k}` | `{d}` | {h} |" for k, d, h in rows]
    return "\n".join(lines) + "\n"
