"""nn.Embedding without its first-call cost on the meta device.

nn.Embedding initialises with normal_, and the first normal_ under `with torch.device("meta")` costs ~1 s
(torch loads its reference decompositions for it): once per process, paid by every CLI edit that sizes or builds
the text encoder there (measured on the CPU, torch 2.14). An explicit empty weight skips the initialisation on
meta; elsewhere the weight is drawn as nn.Embedding draws it.
"""
import torch
import torch.nn as nn


def embedding(num, dim):
    weight = torch.empty(num, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(num, dim, _weight=weight)
