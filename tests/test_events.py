"""Privacy events: validated value objects that carry their sampling scheme and neighbouring relation."""

import json

import pytest

from dpfa.accountants.events import SampledMechanismEvent
from dpfa.errors import PrivacyParameterError


def test_event_is_frozen_and_round_trips():
    e = SampledMechanismEvent("gaussian", 1.1, 0.01, 100, "without-replacement", "replace_one", 60000)
    assert e.sampling == "without_replacement"
    with pytest.raises(AttributeError):
        e.count = 3
    d = json.loads(json.dumps(e.to_dict()))
    assert SampledMechanismEvent.from_dict(d) == e


def test_same_release_ignores_count_only():
    e = SampledMechanismEvent("gaussian", 1.0, 0.01, 10)
    assert e.same_release(e.with_count(99))
    assert not e.same_release(SampledMechanismEvent("gaussian", 1.0, 0.02, 10))
    assert not e.same_release(SampledMechanismEvent("gaussian", 1.0, 0.01, 10, neighboring="replace_one"))


@pytest.mark.parametrize("kwargs, needle", [
    (dict(noise_multiplier=-1.0), "noise_multiplier=-1.0"),
    (dict(sample_rate=0.0), "sample_rate=0.0"),
    (dict(count=0), "steps=0"),
    (dict(sampling="shuffle"), "shuffle"),
    (dict(neighboring="swap"), "swap"),
    (dict(dataset_size=0), "dataset_size=0"),
])
def test_bad_event(kwargs, needle):
    args = dict(mechanism="gaussian", noise_multiplier=1.0, sample_rate=0.1, count=1) | kwargs
    with pytest.raises(PrivacyParameterError) as e:
        SampledMechanismEvent(**args)
    assert needle in str(e.value)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(PrivacyParameterError, match="sigma"):
        SampledMechanismEvent.from_dict({"mechanism": "gaussian", "noise_multiplier": 1.0, "sigma": 2})
