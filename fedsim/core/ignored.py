"""Settings the chosen mechanism or method never reads are refused.

A key set to something other than its default that the experiment's
``privacy.mechanism``, ``privacy.clipping`` or ``peft.method`` ignores would
pass silently and mislead: ``privacy.noise-multiplier = 1.0`` with
``mechanism = "none"`` trains without noise. Each such key is refused with one
line naming it and why. A key equal to its default is harmless (nothing was
asked) and passes, so a resolved ``config.toml``, which lists every key, loads
back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedsim.core.errors import ConfigError

#: ``[privacy]`` keys and the mechanisms that read them (``mechanism`` itself,
#: read by all, is not listed; ``client-sampling`` has its own check in
#: :func:`fedsim.core.loading.check_consistency`).
PRIVACY_READERS: dict[str, tuple[str, ...]] = {
    "noise_multiplier": ("dp-sgd", "dp-fedavg"),
    "max_grad_norm": ("dp-sgd",),
    "target_epsilon": ("dp-sgd", "dp-fedavg"),
    "target_delta": ("dp-sgd", "dp-fedavg"),
    "accountant": ("dp-sgd", "dp-fedavg"),
    "clipping": ("dp-fedavg",),
    "clipping_norm": ("dp-fedavg",),
    "target_unclipped_quantile": ("dp-fedavg",),
    "clip_norm_lr": ("dp-fedavg",),
    "clipped_count_stddev": ("dp-fedavg",),
}
#: ``[privacy]`` keys read only with ``clipping = "adaptive"``.
ADAPTIVE_ONLY = ("target_unclipped_quantile", "clip_norm_lr", "clipped_count_stddev")


def _changed(section: Any) -> dict[str, Any]:
    """The fields of a config section whose value is not the default."""
    return {
        f.name: getattr(section, f.name)
        for f in dataclasses.fields(section)
        if f.default is not dataclasses.MISSING
        and getattr(section, f.name) != f.default
    }


def _shown(value: Any) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def _key(section: str, name: str) -> str:
    return f"{section}.{name.replace('_', '-')}"


def check_ignored(exp: Any) -> None:
    """Refuse a non-default ``[privacy]`` or ``[peft]`` key the experiment's
    mechanism, clipping or method does not read (ConfigError)."""
    privacy = exp.privacy
    changed = _changed(privacy)
    for name, value in changed.items():
        readers = PRIVACY_READERS.get(name)
        if readers is not None and privacy.mechanism not in readers:
            who = " or ".join(repr(r) for r in readers)
            raise ConfigError(
                f"{_key('privacy', name)}: {_shown(value)} is ignored with "
                f"privacy.mechanism = {privacy.mechanism!r} (only {who} reads it); "
                "remove it or choose that mechanism"
            )
        if name in ADAPTIVE_ONLY and privacy.clipping != "adaptive":
            raise ConfigError(
                f"{_key('privacy', name)}: {_shown(value)} is ignored with "
                f"privacy.clipping = {privacy.clipping!r} (adaptive clipping only); "
                "remove it or set privacy.clipping = 'adaptive'"
            )
    peft = exp.peft
    if peft.method == "none":
        for name, value in _changed(peft).items():
            if name != "method":
                raise ConfigError(
                    f"{_key('peft', name)}: {_shown(value)} is ignored with "
                    "peft.method = 'none' (no adapters are trained); remove it or "
                    "set peft.method"
                )
    if len(peft.ranks) > exp.federation.clients:
        raise ConfigError(
            f"peft.ranks: {len(peft.ranks)} entries for federation.clients = "
            f"{exp.federation.clients}; client i gets entry i mod len, so entries "
            f"after the first {exp.federation.clients} would go to no client"
        )
