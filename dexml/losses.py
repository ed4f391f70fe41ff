"""Compatibility alias: the losses live in dexml.train.losses (`dexml.losses.softmax` etc. keep working)."""
from dexml.train.losses import *
from dexml.train.losses import LOSSES, get_loss, pool_loss  # noqa: F401
