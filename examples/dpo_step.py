"""One DPO step on a tiny Llama, with sequence log-probs from ``gx.linear_log_probs``.

    python examples/dpo_step.py [--steps 3] [--beta 0.1] [--check]

The policy is a ``LlamaForCausalLM`` built from its config (hidden 32, 2 layers, vocab 128; random
weights, nothing downloaded), the reference a frozen copy of it, perturbed so that the two differ.
A DPO step (Rafailov et al. 2023), as in TRL's trainer:

1. for each prompt a chosen and a rejected completion (random tokens here), concatenated into one
   batch of ``2 B`` sequences, the labels ``-100`` on the prompt and the padding;
2. each sequence's log-probability ``sum_t log p(y_t | y_<t)`` over its completion tokens, for the
   policy (with gradient) and the reference (without), from the final hidden states and the output
   layer's weight: ``gx.linear_log_probs(hidden, lm_head.weight, labels)``, whose ``ignore_index``
   rows are 0, so the (tokens, vocab) logits never exist;
3. ``loss = -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r)))``, averaged over the prompts;
4. ``loss.backward()`` and an AdamW step.

``sequence_log_probs_torch`` is the same from materialised logits; ``--check`` runs both in float64
and prints the largest difference of the loss and of the policy's gradients (the tests do the same).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import gpuxent as gx

VOCAB = 128
IGNORE = -100


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A 2-layer Llama of width 32 over 128 tokens, random weights from ``seed``."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype)


def reference_of(policy, seed: int = 1):
    """A frozen copy of ``policy`` with its weights perturbed (so that the log-ratios are not all 0)."""
    ref = copy.deepcopy(policy).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.dtype))
    return ref


def make_batch(seed: int = 0, n_prompts: int = 3, prompt_len: int = 4, completion_len: int = 6):
    """``input_ids`` and ``labels`` ``(2 B, L)``: the B chosen sequences, then the B rejected ones."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, VOCAB, (n_prompts, prompt_len), generator=g).repeat(2, 1)
    completions = torch.randint(0, VOCAB, (2 * n_prompts, completion_len), generator=g)
    lengths = torch.randint(2, completion_len + 1, (2 * n_prompts,), generator=g)
    pad = torch.arange(completion_len)[None, :] >= lengths[:, None]
    input_ids = torch.cat([prompts, completions.masked_fill(pad, 0)], 1)
    labels = torch.cat([torch.full_like(prompts, IGNORE), completions.masked_fill(pad, IGNORE)], 1)
    return {"input_ids": input_ids, "labels": labels}


def sequence_log_probs(model, input_ids, labels, *, backend=None, chunk_size=None):
    """Each sequence's summed log-prob of its labelled tokens, ``(2 B,)``: no (2 B, L, vocab) logits."""
    hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1]
    head = model.lm_head
    lp = gx.linear_log_probs(hidden, head.weight, labels[:, 1:], head.bias, backend=backend, chunk_size=chunk_size)
    return lp.log_probs.sum(-1)  # ignored (prompt, padding) tokens are 0


def sequence_log_probs_torch(model, input_ids, labels):
    """The same from materialised logits."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    targets = labels[:, 1:]
    kept = targets != IGNORE
    lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return torch.where(kept, lp, 0).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
    """``-log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r)))``, the mean over prompts."""
    return -F.logsigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))).mean()


def dpo_step(policy, reference, batch, beta=0.1, *, use_gpuxent=True, backend=None, chunk_size=None):
    """The step's loss, its gradients left in the policy's ``.grad``."""
    ids, labels = batch["input_ids"], batch["labels"]
    if use_gpuxent:
        with torch.no_grad():
            ref = sequence_log_probs(reference, ids, labels, backend=backend, chunk_size=chunk_size)
        pol = sequence_log_probs(policy, ids, labels, backend=backend, chunk_size=chunk_size)
    else:
        with torch.no_grad():
            ref = sequence_log_probs_torch(reference, ids, labels)
        pol = sequence_log_probs_torch(policy, ids, labels)
    b = ids.shape[0] // 2
    loss = dpo_loss(pol[:b], pol[b:], ref[:b], ref[b:], beta)
    loss.backward()
    return loss.detach()


def check(beta=0.1):
    """Both ways in float64: ``(loss difference, largest gradient difference, loss)``."""
    batch = make_batch()
    results = []
    for use_gpuxent in (True, False):
        policy = tiny_model(dtype=torch.float64)
        loss = dpo_step(policy, reference_of(policy), batch, beta, use_gpuxent=use_gpuxent)
        results.append((loss, {n: p.grad for n, p in policy.named_parameters()}))
    (l1, g1), (l2, g2) = results
    return float((l1 - l2).abs()), max(float((g1[n] - g2[n]).abs().max()) for n in g1), float(l1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--check", action="store_true", help="compare with materialised logits in float64")
    args = p.parse_args()
    if args.check:
        dl, dg, loss = check(args.beta)
        print(f"float64 loss {loss:.6f}; |loss - torch's| = {dl:.2e}, max |grad - torch's| = {dg:.2e}")
        return
    policy = tiny_model()
    reference = reference_of(policy)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    for step in range(args.steps):
        opt.zero_grad()
        loss = dpo_step(policy, reference, make_batch(seed=step), args.beta)
        opt.step()
        print(f"step {step}: DPO loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
