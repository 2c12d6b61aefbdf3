"""qmoe: compress Mixture-of-Experts models below one bit per expert weight and run them compressed."""

__version__ = "0.1.0"
