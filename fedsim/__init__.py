"""fedsim: federated-learning simulation on Flower and Ray."""

__version__ = "0.1.0"
