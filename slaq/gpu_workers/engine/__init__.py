"""Our inference engine: paged KV cache, continuous batching, prefix caching.

The IO-free core (``config``, ``sequence``, ``block_manager``, ``scheduler``) imports no torch,
so the simulator reuses it; ``model_runner``, ``models/``, ``sampler`` and ``loader`` own torch.
"""
