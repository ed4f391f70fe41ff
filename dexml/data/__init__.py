"""Data in: the canonical dataset (LF layout) and everything that produces or checks it.

dataset (in-memory model, reader, writer), formats (converters from other XMC layouts),
download (sources, fetching, safe extraction), synthetic (the seeded generator), validate
(the great-expectations suite and statistics). No torch.
"""
