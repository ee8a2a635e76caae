"""Privacy audit built into a run: what can an honest-but-curious server
reconstruct from what each strategy uploads?

``[audit]`` (off by default) makes the ServerApp attack, after the rounds it
names, the uploads of some of the round's training clients with the attacks
``audit.attack`` lists, and record per attack the reconstructions' PSNR, matched
one to one to the client's images (``attack-psnr/<attack>``), how many are
recovered (``recovered/<attack>``), the best of them (``attack-psnr``,
``recovered``) and image grids (``attacks/``).

The pieces, each replaceable:

- :mod:`fedsim.audit.replay`, the *surface*: what the server sees of one
  client's exchange and how the attacker replays the client's local work. A
  family names its surface in its declaration (``Family.audit``): FedAvg (and
  DP-SGD under it) the whole model, FLoRA/FedIT the LoRA factors;
  :mod:`fedsim.audit.hypernetwork` HyperFL's and HyperFL-LPM's (the
  hypernetwork, with the private embedding and head as unknowns). A surface
  also says which linear layers' gradients the upload carries
  (:mod:`fedsim.audit.linear`).
- The *attacks*: :mod:`fedsim.audit.inverting` (Inverting Gradients, Geiping
  et al., 2020) and :mod:`fedsim.audit.analytic` (the bias/weight ratio of a
  linear layer, Phong et al., 2017: one local step, or several), functions of
  the sent content, the reply and the public hyper-parameters only; an
  analytic attack whose assumptions fail raises
  :class:`~fedsim.audit.analytic.NotApplicable` with the reason.
- :mod:`fedsim.audit.auditor`, the *auditor*: hears every exchange of the
  round from the recording grid (``observe(server_round, messages, replies,
  partition_of)``), attacks after the round (``after_round``), scores one to
  one (Hungarian assignment, :func:`fedsim.audit.maths.one_to_one`) against the
  seeded partitions and records.
- :mod:`fedsim.audit.activations`, split learning's surfaces and attack:
  the cut-layer activations of the batches ``audit.batches`` (0: the reply to
  the round's ``train`` message) inverted against the head the server sent
  (``audit.attack = "inverting-activations"``): ``sfl-v1``, ``sfl-v2``,
  ``split-ushape`` and ``sfprompt`` (prompts optimised with the inputs).
- :mod:`fedsim.audit.loop`, the dummy-input loop the inverting attacks share.

A surface names the attacks it feeds in its ``attacks`` attribute; every
attack of the experiment's ``audit.attack`` must be one of them.
"""
