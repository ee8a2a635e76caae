"""The run, grouped by the process each part runs in.

- :mod:`fedsim.engine.host`: the process the user starts (``fedsim run``,
  ``fedsim.run(...)``): the front door, pre-run checks, progress, the private
  SuperLink and the processes it starts, ``flwr run`` of the generated app,
  sweeps, remote SuperLinks, Ray clusters.
- :mod:`fedsim.engine.server`: the simulation process (``flwr-simulation``)
  and the ServerApp in it: the round driver, the grid pieces (transport, node
  directory, exchange recording), the run recorder, the resume checkpoint.
- :mod:`fedsim.engine.client`: the Ray actors' ClientApp and the clients'
  private state between rounds.

Lower parts never import higher ones: client < server < host
(``tests/test_layout.py``).
"""
