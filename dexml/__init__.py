"""dexml: dual-encoder extreme multi-label classification."""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import dexml` stays light and the predict path never imports torch.
    if name == "Predictor":
        from dexml.serve.predictor import Predictor

        return Predictor
    raise AttributeError(name)
