"""What runs in the Ray actors: the ClientApp, and the clients' private state
kept between rounds (:mod:`.client_state`, also relayed by the simulation
process)."""
