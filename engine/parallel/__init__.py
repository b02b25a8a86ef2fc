"""Several devices for one edit. torchrun ranks: cfg (cond | uncond rows), seq (Ulysses over the image tokens),
cfg+seq (both); one process: blocks (the transformer's blocks split over --devices, for fitting).
world.py: the launch, the process group, the sync points; cfg.py, seq.py: the two splits of a forward;
denoise.py: a rank's part of the denoise loop; blocks.py: the block split."""
from engine.parallel.world import ParallelError, World, launch  # noqa: F401
