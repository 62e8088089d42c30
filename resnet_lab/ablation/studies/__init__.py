"""The registered studies, and the flat options derived from them.

Registering a study is its line in `REGISTRY`. Its `Options` fields join the common
ones as flat names: the `ablate` flags (`k_max` -> `--k-max`), the manifest, the W&B
config and the sweep's `ablation.*` keys all come from `StudyOptions`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import MISSING, asdict, field, fields, make_dataclass
from typing import Any

from ..study import AblationError, Common, Study, check_fields, common_of, option
from . import (
    adjacent,
    cka,
    hessian,
    influence,
    iterative,
    k,
    landscape,
    paths,
    probes,
    reorder,
    responses,
    shattered,
    single,
)


class Registry:
    def __init__(self, studies: Sequence[Study]) -> None:
        self._by_name = {s.name: s for s in studies}
        if len(self._by_name) != len(studies):
            raise TypeError("two studies share a name")

    def __iter__(self) -> Iterator[Study]:
        return iter(self._by_name.values())

    def __getitem__(self, name: str) -> Study:
        return self._by_name[name]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def selected(self, names: Sequence[str]) -> list[Study]:
        """The studies a run asked for, in registry order (the order units run and rows are stored)."""
        return [s for s in self if s.name in names]

    def metric_owner(self, metric: str) -> Study | None:
        """The study whose summary holds lesion/`metric`."""
        return next((s for s in self if s.produces(metric)), None)


REGISTRY = Registry(
    [
        single.Single(),
        k.KLesion(),
        adjacent.Adjacent(),
        reorder.Reorder(),
        responses.Responses(),
        influence.Influence(),
        paths.Paths(),
        iterative.Iterative(),
        probes.Probes(),
        cka.CKA(),
        landscape.Landscape(),
        hessian.Hessian(),
        shattered.Shattered(),
    ]
)


def _compose(registry: Registry) -> type:
    specs: list[tuple[str, Any, Any]] = [(f.name, f.type, _copy(f)) for f in fields(Common)]
    default = tuple(s.name for s in registry if s.default)
    studies = option(default, "the studies to run", kind="studies", choices=registry.names)
    specs.insert(1, ("studies", tuple[str, ...], studies))
    owner = {f.name: "common" for f in fields(Common)}
    for s in registry:
        for f in fields(s.Options):
            if f.name in owner:
                raise TypeError(f"option {f.name!r} of study {s.name!r} is already an option of {owner[f.name]!r}")
            owner[f.name] = s.name
            specs.append((f.name, f.type, _copy(f)))

    defaults = {name: f.default for name, _, f in specs}

    def __post_init__(self) -> None:
        check_fields(self)  # every field, the common ones and each study's, once
        twice = next((n for i, n in enumerate(self.studies) if n in self.studies[:i]), None)
        if twice:  # stored twice, and a rerun naming it once looked like another configuration
            raise AblationError(f"--studies lists {twice} twice; name each study once")
        for name, study in owner.items():
            given = getattr(self, name)
            if study not in ("common", *self.studies) and given != defaults[name]:
                flag = "--" + name.replace("_", "-")
                raise AblationError(
                    f"{flag} is an option of the {study} study, which is not selected: add {study} to --studies, "
                    f"or drop {flag} (it would be ignored)"
                )

    def asked(self) -> dict[str, Any]:
        """The options that shape this run's results: the common ones and the selected studies'."""
        keep = {n for n, o in owner.items() if o == "common" or o in self.studies} | {"studies"}
        return {k: v for k, v in asdict(self).items() if k in keep}

    doc = "Every `ablate` option that shapes the results: the common ones, then each study's."
    return make_dataclass(
        "StudyOptions",
        specs,
        frozen=True,
        namespace={"__post_init__": __post_init__, "asked": asked, "__doc__": doc, "__module__": __name__},
    )


def _copy(f):
    if f.default is MISSING:
        raise TypeError(f"study option {f.name!r} needs a default")
    return field(default=f.default, metadata=f.metadata)


StudyOptions = _compose(REGISTRY)


def defaults() -> dict[str, Any]:
    return asdict(StudyOptions())


def check_nets(specs: Sequence[Any], opts: Any, models: Sequence[Any] = ()) -> None:
    """Every selected study's refusal of networks it cannot serve, before any evaluation:
    by their specs, and by the loaded models (ablate) or, for a sweep cell before it trains,
    by its net built without memory on the meta device (its weights, blocks and stages)."""
    common = common_of(opts)
    if not models and specs:
        import torch

        from ...models import build

        with torch.device("meta"):
            models = [build(spec) for spec in specs]
    for s in REGISTRY.selected(opts.studies):
        s.check(specs, s.options(opts), common)
        for m in models:
            s.check_model(m, s.options(opts), common)


__all__ = ["REGISTRY", "AblationError", "StudyOptions", "check_nets", "defaults"]
