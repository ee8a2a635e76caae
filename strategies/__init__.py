"""Server-side algorithms. Each module names its paper and message contract.

A strategy module exposes ``build(experiment) -> Strategy`` (a Flower message-API
strategy) and keeps its maths in module-level functions over numpy arrays.
"""
