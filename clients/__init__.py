"""Client-side algorithms: the local training each strategy needs.

A client algorithm is built once per client process from the experiment, the
dataset description and the device, and then serves every client (partition) that
process simulates::

    algorithm = Algorithm(experiment, info, device)
    reply = algorithm.train(content, data, server_round=r, state=context.state)
    reply = algorithm.evaluate(content, data, server_round=r, state=context.state)

``content`` is the received RecordDict, ``data`` the client's
:class:`fedsim.learn.data.ClientData`, ``state`` the client's persistent RecordDict
(Flower's ``Context.state``; keep it small). Each returns the reply RecordDict.
A family's custom action ``train.<action>`` (``Family.actions``) calls the
method ``<action>`` with the same arguments. Local training goes through
:func:`fedsim.learn.training.local_fit` with the experiment's privacy mechanism
(:func:`fedsim.privacy.client_mechanism`), so DP-SGD wraps every family alike;
a family changes the local objective through its ``loss`` and ``penalty``
hooks (``fit_round(..., loss=..., penalty=...)``; FedProx, SCAFFOLD);
:mod:`fedsim.clients.full` holds the shared pieces of a round (``fit_round``,
``train_metrics``, ``evaluation_reply``) that the other algorithms reuse.
"""
