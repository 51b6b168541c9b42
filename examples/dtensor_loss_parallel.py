"""Loss parallelism as torchtitan does it, with gpuxent's fused cross-entropy.

The output layer (lm_head) is column-parallel: each rank holds a slice of the vocabulary's rows of its
weight and produces the logits of that slice, a DTensor sharded on the class axis (Shard(-1)). Given
those logits, gx.cross_entropy runs vocab-parallel over the mesh: no rank ever holds the whole
vocabulary's logits, and the ranks exchange one all-gather of 16 bytes per token per step. The loss
and the gradients equal PyTorch's F.cross_entropy under loss_parallel().

    torchrun --standalone --nproc-per-node 2 examples/dtensor_loss_parallel.py

Runs on CPU with gloo; on GPUs use "cuda" and "nccl" below.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

import gpuxent as gx

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
torch.manual_seed(0)  # the same weights and tokens on every rank

vocab, dim = 1000, 64
model = nn.Sequential(nn.Embedding(vocab, dim), nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, vocab, bias=False))
# torchtitan's plan for the output layer under loss parallelism: keep its output sharded on the vocabulary
parallelize_module(model, mesh, {"3": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)})
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

tokens = torch.randint(0, vocab, (8, 32))
labels = torch.roll(tokens, -1, dims=1)
labels[:, -1] = -100  # no next token: ignored

for step in range(5):
    logits = model(tokens)  # DTensor (8, 32, vocab), Shard(-1): each rank holds vocab / 2 classes
    loss = gx.cross_entropy(logits, labels)  # vocab-parallel; a replicated DTensor
    loss.backward()  # the logits' gradient: a DTensor sharded like them
    if step == 0:  # the same as PyTorch's loss_parallel(), loss and gradient
        grad = model[3].weight.grad.full_tensor()
        model.zero_grad()
        with loss_parallel():
            reference = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten())
            reference.backward()
        torch.testing.assert_close(loss.full_tensor(), reference.full_tensor())
        torch.testing.assert_close(grad, model[3].weight.grad.full_tensor())
    optimizer.step()
    optimizer.zero_grad()
    if dist.get_rank() == 0:
        print(f"step {step}: loss {loss.item():.4f}")

if dist.get_rank() == 0:
    print("OK: gx.cross_entropy on Shard(-1) logits equals loss_parallel()")
dist.destroy_process_group()
