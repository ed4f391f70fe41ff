"""Compatibility alias: the losses live in dexml.train.losses (`dexml.losses.softmax` etc. keep working)."""
from dexml.train.losses import *  # noqa: F401,F403
from dexml.train.losses import LOSSES, get_loss  # noqa: F401
