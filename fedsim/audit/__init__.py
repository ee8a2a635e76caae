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

How split learning's activation inversion plugs in: its family declares a
surface whose :class:`~fedsim.audit.replay.Scene` ``observed`` holds the
cut-layer activations the server received (instead of an update) and whose
``forward`` is the client segment the server knows after aggregation; the
attack then matches ``forward(x)`` to ``observed`` (an L2 or cosine distance,
same TV prior, same dummy-input loop and scoring). The auditor's ``observe``
already receives every ``train.<action>`` exchange of a round, so the
activation exchange reaches it without engine changes; only the choice of
exchange (today: the client's latest one carrying ``arrays`` both ways) and a
matching loss per scene kind are to add.
"""
