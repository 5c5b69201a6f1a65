"""Privacy accountants: RDP (own), PRV (prv-accountant), PLD (dp-accounting), and amplification."""

from dpfa.accountants.base import Accountant
from dpfa.accountants.events import SampledMechanismEvent
from dpfa.accountants.registry import create, get, names, register
from dpfa.accountants.rdp import RDPAccountant
from dpfa.accountants.prv import PRVAccountant
from dpfa.accountants.pld import PLDAccountant
from dpfa.accountants.amplification import SubsamplingAmplification
from dpfa.accountants.calibration import epsilon_for, noise_multiplier_for
from dpfa.accountants.numerical import AccountingFallbackWarning

for _cls in (RDPAccountant, PRVAccountant, PLDAccountant):
    register(_cls)
del _cls

__all__ = [
    "Accountant", "SampledMechanismEvent", "RDPAccountant", "PRVAccountant", "PLDAccountant",
    "SubsamplingAmplification", "create", "get", "names", "register", "epsilon_for", "noise_multiplier_for",
    "AccountingFallbackWarning",
]
