"""Tensor parallelism: ``plan`` (finding, checking and applying a plan with DTensor) and ``share``
(one rank's share of a model under a plan, for the memory estimate)."""
