"""Attacks that turn an epsilon claim into something testable (issue 7).

- :mod:`~dpfa.attacks.bounds`: Clopper-Pearson intervals and the empirical epsilon lower
  bound of a hypothesis test (Kairouz et al. 2015; Jagielski et al. 2020).
- :mod:`~dpfa.attacks.thresholds`: how the rejection region is chosen (Split,
  Bonferroni, Explicit) so that the bound keeps its confidence.
- :mod:`~dpfa.attacks.mechanism_audit`: :func:`audit_mechanism`, a mechanism run many
  times on two neighbouring inputs; :func:`audit_dpsgd_noise`, the same for the noise
  that the DP-SGD optimizer adds to the clipped sum.
- :mod:`~dpfa.attacks.membership`: the loss-threshold membership-inference attack
  (Yeom et al. 2018): ROC, AUC, TPR at low FPR, and its epsilon lower bound.
- :mod:`~dpfa.attacks.shadow`: the shadow-model attack (Shokri et al. 2017) and shadow training.
- :mod:`~dpfa.attacks.lira`: LiRA, online and offline (Carlini et al. 2022).
- :mod:`~dpfa.attacks.one_run`: the one-run audit (Steinke, Nasr & Jagielski 2023).
- :mod:`~dpfa.attacks.release_audit`: :func:`audit_attention_release`, the DP attention
  release on its worst-case pair of stores.
- :mod:`~dpfa.attacks.whitebox_audit`: :func:`audit_dpsgd_whitebox`, the engine's steps with a
  gradient canary, the empirical GDP mu against the accountant's (Nasr et al. 2023).
- :mod:`~dpfa.attacks.timing`: the exact discrete Gaussian sampler's running time against
  sigma and |value| (Welch t-tests; Jin et al. 2022).
- :mod:`~dpfa.attacks.privacy_check`: :func:`privacy_check`, all the quick audits in one
  report (``dpfa check`` on the command line).
- :mod:`~dpfa.attacks.runner`: the membership-inference audit of DP-SGD at several epsilons
  (``dpfa audit``, ``experiments/configs/audit.toml``); not imported here (it trains models).
"""

from dpfa.attacks.bounds import (EpsilonBound, clopper_pearson, clopper_pearson_lower, clopper_pearson_upper,
                                 epsilon_from_rates, epsilon_lower_bound)
from dpfa.attacks.thresholds import (Bonferroni, Explicit, ScoreBound, Split, epsilon_lower_bound_from_scores)
from dpfa.attacks.mechanism_audit import AuditResult, audit_mechanism, audit_samples
from dpfa.attacks.dpsgd_audit import audit_dpsgd_noise
from dpfa.attacks.membership import MembershipAttackResult, loss_threshold_attack
from dpfa.attacks.shadow import (ScoreAttackResult, membership_result_from_scores, shadow_attack,
                                 shadow_model_attack, train_shadow_models)
from dpfa.attacks.lira import (LiraRun, lira_attack, lira_inclusion, lira_leave_one_out, lira_scores,
                               logit_scaled_confidence, run_lira)
from dpfa.attacks.one_run import (OneRunAuditResult, canary_inclusion, one_run_audit, one_run_epsilon_lower_bound,
                                  one_run_p_value)
from dpfa.attacks.release_audit import audit_attention_release
from dpfa.attacks.privacy_check import PrivacyCheckReport, privacy_check
from dpfa.attacks.whitebox_audit import WhiteBoxAuditResult, accountant_mu, audit_dpsgd_whitebox, empirical_mu
from dpfa.attacks.timing import TimingReport, WelchResult, exact_sampler_timing_report, welch_timing_test

__all__ = [
    "EpsilonBound", "clopper_pearson", "clopper_pearson_lower", "clopper_pearson_upper", "epsilon_from_rates",
    "epsilon_lower_bound", "Bonferroni", "Explicit", "ScoreBound", "Split", "epsilon_lower_bound_from_scores",
    "AuditResult", "audit_mechanism", "audit_samples", "audit_dpsgd_noise", "MembershipAttackResult",
    "loss_threshold_attack", "audit_attention_release", "PrivacyCheckReport", "privacy_check",
    "ScoreAttackResult", "membership_result_from_scores", "shadow_attack", "shadow_model_attack",
    "train_shadow_models", "LiraRun", "lira_attack", "lira_inclusion", "lira_leave_one_out", "lira_scores",
    "logit_scaled_confidence", "run_lira", "OneRunAuditResult", "canary_inclusion", "one_run_audit",
    "one_run_epsilon_lower_bound", "one_run_p_value",
    "WhiteBoxAuditResult", "accountant_mu", "audit_dpsgd_whitebox", "empirical_mu",
    "TimingReport", "WelchResult", "exact_sampler_timing_report", "welch_timing_test",
]
