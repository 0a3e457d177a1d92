"""roar: which attribution method to trust, and which training examples are hard."""

__version__ = "0.1.0"
