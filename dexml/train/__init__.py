"""Training, the only part that needs torch: the dual encoder, its losses, the label pools
of each negatives mode, the token cache, the training loop and its distributed plumbing.

Nothing here is imported by the serving side (dexml.serve).
"""
