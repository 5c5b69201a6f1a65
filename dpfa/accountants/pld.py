"""Placeholder: the accountants work replaces this file."""
from dpfa.accountants.base import Accountant


class PLDAccountant(Accountant):
    name = "pld"
