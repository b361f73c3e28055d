"""The step's types, below the layers: what the scheduler decides for a step (:mod:`.plan`) and what every layer
of one forward pass reads (:mod:`.context`). Layers and models import only from here, never from the engine."""
