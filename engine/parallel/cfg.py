"""CFG-parallel: the cond row on the ranks of cfg_rank 0, the uncond row on those of cfg_rank 1; one all-gather
of the velocity per step, after which every rank holds every row and takes the same Euler step (the latents
stay identical on all ranks without being sent again)."""
import torch
import torch.distributed as dist


def my_rows(world, B):
    """The batch rows this rank computes: its CFG row (B == cfg_size), or all rows without cfg-parallel."""
    if world.cfg_size == 1:
        return slice(0, B)
    if B != world.cfg_size:
        raise ValueError(f"cfg-parallel over {world.cfg_size} ranks got {B} rows")
    return slice(world.cfg_rank, world.cfg_rank + 1)


def assemble(parts, cfg_size, seq_size, N):
    """parts[rank] [b, n, C] (rank = cfg_rank * seq_size + seq_rank: row group cfg_rank, token shard seq_rank)
    -> [cfg_size * b, N, C]: the shards of a row joined in token order (padding past N cut), rows in order."""
    rows = [torch.cat(parts[c * seq_size:(c + 1) * seq_size], dim=1)[:, :N] for c in range(cfg_size)]
    return torch.cat(rows, dim=0)


def gather_velocity(world, out, N):
    """This rank's output [b, n, C] -> every rank's, assembled: [B, N, C] (one all_gather over the world)."""
    out = out.contiguous()
    parts = [torch.empty_like(out) for _ in range(world.size)]
    dist.all_gather(parts, out)
    return assemble(parts, world.cfg_size, world.seq_size, N)
