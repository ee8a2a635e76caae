"""What runs in the simulation process (``flwr-simulation``): Flower's runtime
with fedsim's patches (:mod:`.simulation_process`) and the ServerApp
(:mod:`.server_app`): the round driver, the grid pieces, the run recorder, the
resume checkpoint."""
