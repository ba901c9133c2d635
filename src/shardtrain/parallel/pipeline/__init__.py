"""Pipeline parallelism on ``torch.distributed.pipelining``, in the order it happens:

``options`` (what the user asked for, checked when the strategy is made), ``split`` (cutting a model
into stages), ``stages`` (building this rank's stages at set-up), ``schedule`` (running a step's
micro-batches through them: the ``Pipeline``).
"""
