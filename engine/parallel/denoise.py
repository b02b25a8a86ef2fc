"""This rank's part of pipelines.common.denoise: `share` hands rank 0's loop inputs to every rank, `velocity`
computes this rank's rows / token shard and returns every row's whole velocity (so each rank then takes the
same CFG combination and Euler step). common.denoise calls both when models.parallel is set."""
import torch
import torch.distributed as dist

from engine.parallel.cfg import gather_velocity, my_rows
from engine.parallel.seq import Ulysses


class ParallelDenoise:
    def __init__(self, world, mm):
        self.world = world
        self.seq = None
        if "seq" in world.mode:     # (a one-rank seq world, built by benchmarks, runs the exchanges too)
            self.seq = Ulysses(world.seq_group, world.seq_size, world.seq_rank,
                               mm.cfg.num_attention_heads).install(mm)
        self.left = 0            # collectives of the loop still to come (the loop is "open" while > 0)
        self.step_calls = 1      # collective rounds per step: the velocity, + the blend broadcast when blending

    def share(self, models, latents, cond_tokens, txt, txt_len, img_shapes, sigmas, timesteps, cfg, blend):
        """Rank 0's denoise inputs on every rank (sync point 3). On rank 0 they come back as given (blend
        then also broadcasts the blended latents); the others get device copies and a blend that receives."""
        world, dev = self.world, models.device
        payload = None
        if world.rank == 0:
            payload = dict(latents=latents.cpu(), cond=cond_tokens.cpu(), txt=txt.cpu(), txt_len=txt_len.cpu(),
                           img_shapes=list(img_shapes), sigmas=sigmas.cpu(), timesteps=timesteps.cpu(), cfg=cfg,
                           blend=blend is not None)
        got = world.sync(payload=payload)[0]
        self.step_calls = 2 if got["blend"] else 1
        self.left = len(got["timesteps"]) * self.step_calls
        world.in_loop = True
        if world.rank == 0:
            return (latents, cond_tokens, txt, txt_len, img_shapes, sigmas, timesteps, cfg,
                    blend and (lambda i, z: self._broadcast(blend(i, z))))
        to = lambda t: t.to(dev)   # noqa: E731
        return (to(got["latents"]), to(got["cond"]), to(got["txt"]), got["txt_len"], got["img_shapes"],
                got["sigmas"], got["timesteps"], got["cfg"],
                (lambda i, z: self._broadcast(z)) if got["blend"] else None)

    def velocity(self, mm, x, txt, txt_len, t, img_shapes, rope, mods):
        """x [B, N, 64] (every row, identical on all ranks) -> mm's output [B, N, out] for every row, this
        rank having computed its row (cfg) and/or its token shard (seq)."""
        rows = my_rows(self.world, x.shape[0])
        x, txt, txt_len, t = x[rows], txt[rows], txt_len[rows], t[rows]
        if self.seq is not None:
            out = self.seq.forward(mm, x, txt, txt_len, t, img_shapes, rope, mods)
        else:
            out = mm(x, txt, txt_len, t, img_shapes, rope=rope, mods=mods)
        v = gather_velocity(self.world, out, x.shape[1])
        self._done()
        return v

    def _broadcast(self, latents):
        """Rank 0's latents after its blend (an inpaint's re-noised original) on every rank."""
        latents = latents.contiguous()
        dist.broadcast(latents, src=0)
        self._done()
        return latents

    def _done(self):
        self.left -= 1
        if self.left <= 0:
            self.world.in_loop = False


def forward_all(world, mm, x, txt, txt_len, t, img_shapes, rope=None, mods=None):
    """One MMDiT forward split as an edit's steps are (every rank calls it with the same inputs): mm's
    output [B, N, out] for every row on every rank. For tests and benchmarks."""
    rope = rope if rope is not None else mm.rope(img_shapes, txt.shape[1], x.device)
    if mods is None:
        mods = mm.modulations(mm.time_embedding(t[:1].to(x.dtype)))
    par = getattr(mm, "_parallel", None)
    if par is None or par.world is not world:
        par = mm._parallel = ParallelDenoise(world, mm)
    par.left = 1 << 30         # not an edit's loop: no bookkeeping of its end
    with torch.inference_mode():
        return par.velocity(mm, x, txt, txt_len, t, img_shapes, rope, mods)
