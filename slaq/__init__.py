"""slaq: SLA-tiered LLM inference on Celery queues, scheduled by KV-cache pressure."""

import os

__version__ = "0.1.0"

# torch's CPU allocator advises transparent huge pages (MADV_HUGEPAGE) for tensors of 2 MiB
# and more when this is set; it reads it once, at its first allocation, so it is set here,
# before any slaq module imports torch. On CPU every decode step streams the weights and the
# running sequences' KV blocks: on stop 13's 2-core EPYC (THP "madvise") a batch-32 SmolLM2
# decode step took about 17% less time (cpu_kernels' paged attention, medians over 40 steps).
# A process that imported torch before slaq keeps small pages; set to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
