"""The pipeline: one module per DVC stage (download, validate, train, export, index, evaluate),
each with `run(params, root)`, plus promotion, presets and the TF-IDF baseline.

Stage modules map the file contracts (dexml.paths) onto the libraries in dexml.data,
dexml.train and dexml.serve; they are what `dexml <stage>` and stages/<stage>.py run.
"""
