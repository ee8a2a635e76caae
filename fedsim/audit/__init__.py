"""Privacy audit built into a run: what can an honest-but-curious server
reconstruct from what each strategy uploads?

``[audit]`` (off by default) makes the ServerApp attack, after the rounds it
names, the uploads of some of the round's training clients, and record the
reconstructions' PSNR (``attack-psnr``) and image grids (``attacks/``).

The pieces, each replaceable:

- :mod:`fedsim.audit.replay`, the *surface*: what the server sees of one
  client's exchange and how the attacker replays the client's local work. A
  family names its surface in its declaration (``Family.audit``): FedAvg (and
  DP-SGD under it) the whole model, FLoRA/FedIT the LoRA factors, HyperFL the
  hypernetwork with the private embedding and head as unknowns.
- :mod:`fedsim.audit.inverting`, the *attack*: Inverting Gradients (Geiping et
  al., 2020), a function of the sent content, the reply and the public
  hyper-parameters only.
- :mod:`fedsim.audit.auditor`, the *auditor*: hears every exchange of the
  round from the recording grid (``observe(server_round, messages, replies,
  partition_of)``), attacks after the round (``after_round``), scores against
  the seeded partitions and records.
- :mod:`fedsim.audit.activations`, split learning's surfaces and attack:
  the cut-layer activations of the client's first batch (the reply to the
  round's ``train`` message) inverted against the head the server sent
  (``audit.attack = "inverting-activations"``): ``sfl-v1``, ``sfl-v2``,
  ``split-ushape`` and ``sfprompt`` (prompts optimised with the inputs).
- :mod:`fedsim.audit.loop`, the dummy-input loop both attacks share.

A surface names the attack it feeds in its ``attack`` attribute (none:
Inverting Gradients); the experiment's ``audit.attack`` must match it.
"""
