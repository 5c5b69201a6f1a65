"""Privacy events: what was released, nothing else (in the manner of dp-accounting's dp_event.py).

An event is a small frozen value object. Accountants compose lists of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from dpfa import _validate
from dpfa.errors import PrivacyParameterError

SAMPLING_SCHEMES = ("poisson", "without_replacement")
NEIGHBORING_RELATIONS = ("add_remove", "replace_one")
#: the neighbouring relation that matches each sampling scheme when none is given
DEFAULT_RELATION = {"poisson": "add_remove", "without_replacement": "replace_one"}


def normalize_sampling(name: str) -> str:
    """Accept the CLI spelling ``without-replacement`` as well."""
    if isinstance(name, str):
        name = name.replace("-", "_")
    return _validate.choice(name, "sampling", SAMPLING_SCHEMES)


@dataclasses.dataclass(frozen=True, slots=True)
class SampledMechanismEvent:
    """``count`` releases, each of a subsample of the data, through ``mechanism``.

    Each release computes a query whose sensitivity (in the mechanism's norm) is C and
    adds noise of scale ``noise_multiplier * C``. The subsample is drawn by ``sampling``:
    ``"poisson"`` keeps each example independently with probability ``sample_rate``;
    ``"without_replacement"`` draws a fixed-size batch of ``sample_rate * dataset_size``
    examples. ``neighboring`` is the relation between datasets: ``"add_remove"`` (add or
    remove one example) or ``"replace_one"`` (replace one example by another, which
    doubles the L2 / L1 change of a sum). A ``sample_rate`` of 1 is no subsampling.
    """

    mechanism: str
    noise_multiplier: float
    sample_rate: float = 1.0
    count: int = 1
    sampling: str = "poisson"
    neighboring: str = "add_remove"
    dataset_size: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.mechanism, str) or not self.mechanism:
            raise PrivacyParameterError(f"Expected mechanism to be a registered name, got {self.mechanism!r}.")
        object.__setattr__(self, "noise_multiplier", _validate.noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", _validate.sample_rate(self.sample_rate))
        object.__setattr__(self, "count", _validate.count(self.count, "steps"))
        object.__setattr__(self, "sampling", normalize_sampling(self.sampling))
        _validate.choice(self.neighboring, "neighboring", NEIGHBORING_RELATIONS)
        if self.dataset_size is not None:
            object.__setattr__(self, "dataset_size", _validate.count(self.dataset_size, "dataset_size"))

    def with_count(self, count: int) -> "SampledMechanismEvent":
        return dataclasses.replace(self, count=count)

    def same_release(self, other: "SampledMechanismEvent") -> bool:
        """True when the two events differ at most in ``count`` (so they can be merged)."""
        return dataclasses.replace(other, count=self.count) == self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampledMechanismEvent":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise PrivacyParameterError(f"Unknown event fields {sorted(unknown)}; expected {sorted(fields)}.")
        return cls(**d)
