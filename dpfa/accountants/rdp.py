"""Placeholder: the accountants work replaces this file."""
from dpfa.accountants.base import Accountant


class RDPAccountant(Accountant):
    name = "rdp"
