"""ModelFence: a gateway that protects paid model-inference APIs from extraction."""

__version__ = "0.1.0"
__all__ = ["__version__"]
