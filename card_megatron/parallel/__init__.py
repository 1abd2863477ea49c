"""Process groups (``state``), the DeepSpeed seam (``deepspeed_glue``) and the CPU adapter.

Importing this package applies the CPU adapter (``cpu_adapter.apply_cpu_adapter``; nothing
with CUDA) once, before any module of card_megatron imports DeepSpeed: DeepSpeed picks its
accelerator when it is imported. The packages that import DeepSpeed (``model``, ``training``)
import this one first, in their ``__init__``, so their modules import DeepSpeed at the top.
"""

from card_megatron.parallel.cpu_adapter import apply_cpu_adapter

apply_cpu_adapter()
