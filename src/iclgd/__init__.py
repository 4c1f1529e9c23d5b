"""iclgd: in-context learning as implicit gradient descent, measured on real models."""

__version__ = "0.1.0"
