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
"""
