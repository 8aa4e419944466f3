"""How a loss family is a registry: each loss is a pure function whose keyword-only parameters are the
hyperparameters it reads; a spec holds the function and the flags the stage reads; a registry tells every spec
which hyperparameters the family knows, so a misspelt one is an error, never silently dropped."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from alignkit.errors import did_you_mean


@functools.cache
def reads(loss: Callable[..., torch.Tensor]) -> frozenset[str]:
    """The hyperparameters a loss reads: its keyword-only parameters (the signature is the declaration)."""
    params = inspect.signature(loss).parameters.values()
    return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


@dataclass(frozen=True)
class Registered:
    """A loss in a registry, called as `spec.fn(*inputs, **hyper)` with the hyperparameters of the whole
    registry: the loss gets those it reads; a keyword no loss of the registry reads is a TypeError (a
    misspelling is never dropped silently)."""

    loss: Callable[..., torch.Tensor]
    known: frozenset[str] | None = field(
        default=None, kw_only=True
    )  # set by `registry`; None: the loss's own

    def fn(self, *inputs: Any, **hyper: Any) -> torch.Tensor:
        own = reads(self.loss)
        known = own if self.known is None else self.known
        unknown = [key for key in hyper if key not in known]
        if unknown:
            raise TypeError(
                f"{self.loss.__name__}: unknown loss keyword `{unknown[0]}`{did_you_mean(unknown[0], known)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return self.loss(*inputs, **{key: value for key, value in hyper.items() if key in own})


S = TypeVar("S", bound=Registered)


def registry(specs: dict[str, S]) -> dict[str, S]:
    """The specs, each told every hyperparameter some loss among them reads."""
    known = frozenset().union(*(reads(spec.loss) for spec in specs.values()))
    return {name: dataclasses.replace(spec, known=known) for name, spec in specs.items()}
