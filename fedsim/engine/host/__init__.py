"""What runs in the process the user starts (``fedsim``, a notebook): the front
door (:mod:`.front_door`) behind the CLI and the Python API, pre-run checks,
progress, the private SuperLink and ``flwr run``, sweeps, remote SuperLinks and
Ray clusters."""
