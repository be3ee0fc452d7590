"""gradwatch: find, explain and fix vanishing and exploding gradients in PyTorch."""

__version__ = "0.1.0"
