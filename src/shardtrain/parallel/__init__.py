"""The techniques: each applied to an unchanged model by one function, and composed by the strategies.

``dims`` (the mesh and its degrees), ``fsdp``, ``tensor_parallel/``, ``pipeline/``,
``activation_checkpoint``, ``compile``, ``materialize`` (meta-device models made real, from
``weight_source``), ``policy`` (which modules a technique applies to). Nothing here imports a
strategy, the Engine or the Trainer.
"""
