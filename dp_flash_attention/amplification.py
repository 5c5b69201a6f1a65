"""The seed's ``dp_flash_attention.amplification``: :class:`dpfa.accountants.SubsamplingAmplification`.

``SubsamplingAmplification(base_epsilon, sampling_rate, num_steps, sampling="poisson", base_delta=0.0)``:
``num_steps`` runs of a (base_epsilon, base_delta)-DP mechanism, each on a subsample, composed
tightly through a privacy loss distribution (``compute_epsilon(delta)``, ``compute_delta(epsilon)``).
"""

from dpfa.accountants.amplification import SubsamplingAmplification

__all__ = ["SubsamplingAmplification"]
