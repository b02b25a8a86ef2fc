"""Sequence-parallel (Ulysses): the image tokens of the joint [image, text] sequence are split into P
contiguous shards, one per rank of the sequence group; everything in a block but attention is per token and
runs on the shard. Around the attention core (JointAttention.attend, replaced per instance by install()) one
all-to-all turns [B, N/P, H, D] (my tokens, all heads) into [B, N, H/P, D] (all tokens, my heads), and one
turns the attention output back; the core itself is still ops.attention, over the whole sequence.

Text tokens are replicated, not sharded: they are ~3% of a 1024² edit's tokens (430 of 12.7k) and under 1% at
4K, so computing them on every rank costs little, while sharding them would split each row's valid prefix
(the kv_len masking needs text padding last) and need L divisible by P. Each rank takes its heads' slice of
the (identical) text q/k/v, and the text's attention output is all-gathered over heads (B x L x C, small).

Shards are padded to n = ceil(N / P) tokens (zeros past N, on the last ranks): equal shards for the
all-to-all; the padding never enters attention (cut after the exchange) and is cut from the output.
On a shard: RoPE takes the shard's rows of the table (then the text's); the zero_cond_t split (noisy tokens
first, then the condition tokens) becomes the shard's own first condition token; kv_len counts the whole
sequence (N + text length) once the tokens are gathered.
"""
import math

import torch
import torch.distributed as dist

from engine import ops


class Ulysses:
    def __init__(self, group, size, rank, heads):
        if heads % size:
            raise ValueError(f"{size} sequence ranks do not divide {heads} heads")
        self.group, self.size, self.rank, self.heads = group, size, rank, heads
        self.tokens = None      # (n, N) of the forward in flight: shard length, whole image-token count
        self._rope = (None, None)

    def install(self, mm):
        """Every block's attention core exchanges sequence for heads around ops.attention."""
        for blk in mm.transformer_blocks:
            blk.attn.attend = self.attend
        return self

    def shard(self, N):
        """(start, n): this rank's first image token and the (padded) shard length."""
        n = math.ceil(N / self.size)
        return self.rank * n, n

    def forward(self, mm, x, txt, txt_len, t, img_shapes, rope, mods):
        """mm's output [B, n, out] for this rank's shard of the image tokens x [B, N, 64] (all rows)."""
        N = x.shape[1]
        start, n = self.shard(N)
        xs = x.new_zeros(x.shape[0], n, x.shape[2])
        mine = x[:, start:start + n]
        xs[:, :mine.shape[1]] = mine
        noisy = math.prod(img_shapes[0])
        a = min(max(noisy - start, 0), n)     # this shard's noisy tokens: the zero_cond_t split falls at a
        # the shard as two one-row "images" (its noisy, then its condition tokens): mm reads img_shapes only
        # for the token count and the split here, since the RoPE table is given
        shapes = [(1, 1, a), (1, 1, n - a)]
        self.tokens = (n, N)
        try:
            return mm(xs, txt, txt_len, t, shapes, rope=self.shard_rope(rope, N, start, n), mods=mods)
        finally:
            self.tokens = None

    def shard_rope(self, rope, N, start, n):
        """(cos, sin) [N + L, D/2] -> the shard's image rows (zeros for padding), then the text's rows."""
        key, cached = self._rope
        if key is not rope:
            def one(c):
                img = torch.cat([c[:N], c.new_zeros(self.size * n - N, c.shape[1])])
                return torch.cat([img[start:start + n], c[N:]])
            cached = tuple(one(c) for c in rope)
            self._rope = (rope, cached)
        return cached

    def attend(self, q, k, v, kv_len, kv_host=None):
        """q, k, v [B, n + L, H, D] (this shard's image tokens, then all text) -> [B, n + L, H, D]."""
        if self.tokens is None:
            return ops.attention(q, k, v, kv_len=kv_len, kv_host=kv_host)
        n, N = self.tokens
        B, S, H, D = q.shape
        h = H // self.size
        mine = slice(self.rank * h, (self.rank + 1) * h)
        joint = q.new_empty(3, B, N + S - n, h, D)          # q, k, v over the whole sequence, my heads
        self.to_heads((q, k, v), n, N, joint)
        for i, t in enumerate((q, k, v)):
            joint[i, :, N:] = t[:, n:, mine]                # the text: replicated, so only my heads' slice
        kv_len = kv_len + (N - n)
        kv_host = None if kv_host is None else tuple(x + N - n for x in kv_host)
        out = ops.attention(joint[0], joint[1], joint[2], kv_len=kv_len, kv_host=kv_host)  # [B, N + L, h, D]
        res = q.new_empty(B, S, H, D)
        self.to_tokens(out, n, N, res)
        self.gather_heads(out[:, N:], res[:, n:])
        return res

    def _spans(self, n, N):
        """(rank j, its first token, its real token count) for the shards of N tokens, n per rank."""
        return [(j, j * n, max(0, min(n, N - j * n))) for j in range(self.size)]

    def to_heads(self, qkv, n, N, joint):
        """(q, k, v) [B, n + L, H, D] (my tokens first, all heads) -> joint[:, :, :N] of [3, B, N + L, H/P, D]
        (every rank's tokens in rank order, my heads): block j of H/P heads goes to rank j."""
        B, _, H, D = qkv[0].shape
        P, h = self.size, H // self.size
        send = qkv[0].new_empty(P, 3, B, n, h, D)
        for i, t in enumerate(qkv):
            send[:, i] = t[:, :n].unflatten(2, (P, h)).permute(2, 0, 1, 3, 4)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)            # recv[j]: rank j's tokens, my heads
        for j, s, m in self._spans(n, N):
            if m:
                joint[:, :, s:s + m] = recv[j, :, :, :m]

    def to_tokens(self, out, n, N, res):
        """out [B, N + L, H/P, D] (all tokens, my heads) -> res[:, :n] of [B, n + L, H, D] (my tokens, all
        heads in rank order); the padding past N is sent as zeros."""
        B, _, h, D = out.shape
        send = out.new_empty(self.size, B, n, h, D)
        for j, s, m in self._spans(n, N):
            send[j, :, :m] = out[:, s:s + m]
            send[j, :, m:] = 0
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)            # recv[j]: my tokens, rank j's heads
        res[:, :n].unflatten(2, (self.size, h)).copy_(recv.permute(1, 2, 0, 3, 4))

    def gather_heads(self, y, res):
        """y [B, L, H/P, D] -> res [B, L, H, D]: the text rows' heads from every rank of the group."""
        y = y.contiguous()
        parts = [torch.empty_like(y) for _ in range(self.size)]
        dist.all_gather(parts, y, group=self.group)
        h = y.shape[2]
        for j, part in enumerate(parts):
            res[:, :, j * h:(j + 1) * h] = part
