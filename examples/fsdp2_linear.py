"""FSDP2 (fully_shard) with gpuxent's fused linear cross-entropy.

gx.linear_cross_entropy takes the hidden states and the output layer's weight and never builds the
(tokens, vocabulary) logits. Call it inside the model's forward, where FSDP2 has gathered the weight:
the gradients then flow back through FSDP2's reduce-scatter as any layer's do.

    torchrun --standalone --nproc-per-node 2 examples/fsdp2_linear.py

Runs on CPU with gloo; on GPUs use "nccl" and move the model and the batch to the rank's GPU.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import fully_shard

import gpuxent as gx


class TinyLM(nn.Module):
    def __init__(self, vocab=1000, dim=64, n_layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(n_layers))
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, labels):
        h = self.embed(tokens)
        for layer in self.layers:
            h = h + layer(h)
        # inside the forward: the weight is unsharded here, and no (tokens, vocab) logits are built
        return gx.linear_cross_entropy(h, self.lm_head.weight, labels)


dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # the same initial weights on every rank
model = TinyLM()
for layer in model.layers:
    fully_shard(layer)
fully_shard(model)  # the embedding and the output layer: the root's parameter group
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

gen = torch.Generator().manual_seed(rank)  # each rank its own batch (data parallel)
tokens = torch.randint(0, 1000, (8, 32), generator=gen)
labels = torch.roll(tokens, -1, dims=1)
labels[:, -1] = -100

losses = []
for step in range(5):
    loss = model(tokens, labels)
    loss.backward()  # FSDP2 reduce-scatters (averages) the gradients over the ranks
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
    if rank == 0:
        print(f"step {step}: loss {loss.item():.4f}")

assert losses[-1] < losses[0], losses
if rank == 0:
    print("OK: FSDP2 training with gx.linear_cross_entropy")
dist.destroy_process_group()
