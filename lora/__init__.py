"""LoRA: fused into the weights at export/build time, or switched at run time without a rebuild.

:mod:`.files` reads and checks LoRA files and turns them into weight deltas with diffusers'
own loader; :mod:`.switch` applies LoRA sets to a running pipeline's components.
"""
