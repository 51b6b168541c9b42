"""One GRPO step on a tiny Llama, with per-token log-probs and entropy from ``gx.linear_log_probs``.

    python examples/grpo_step.py [--steps 3] [--temperature 0.7] [--check]

The model is a ``LlamaForCausalLM`` built from its config (hidden 32, 2 layers, vocab 128; random
weights, nothing downloaded). A GRPO step, as in TRL's and verl's trainers:

1. a group of ``--group`` completions per prompt (here random tokens, with padding after some
   completions' end), a reward per completion, and the group-normalised advantage
   ``(reward - mean) / (std + 1e-4)`` of its group, given to each of its tokens;
2. the policy's per-token log-probs and entropies of the completion tokens at the sampling
   ``temperature``: ``gx.linear_log_probs(hidden, lm_head.weight, next_tokens, temperature=T,
   entropy=True)`` on the final hidden states, so the (tokens, vocab) logits never exist;
3. the clipped-ratio policy loss ``-min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)`` with
   ``ratio = exp(logp - logp_old)`` (``logp_old``: the log-probs of the policy that sampled, here the
   current ones perturbed so that some ratios clip), averaged over each completion's tokens (the
   mask) and then over completions, minus ``entropy_coef`` times the masked mean entropy;
4. ``loss.backward()`` and an AdamW step.

``token_log_probs_torch`` is the same step from materialised logits (``model(...).logits``), as a
trainer without gpuxent computes it; ``--check`` runs both in float64 and prints the largest
difference of the loss and of the parameter gradients (the tests do the same).
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gpuxent as gx

VOCAB = 128


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A 2-layer Llama of width 32 over 128 tokens, random weights from ``seed``."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype)


def make_batch(seed: int = 0, n_prompts: int = 2, group: int = 4, prompt_len: int = 5, completion_len: int = 7):
    """Token ids ``(B, L)`` (B = prompts x group), the completion mask of the next-token positions
    ``(B, L - 1)`` (1 on completion tokens before the padding), and each token's advantage ``(B, L - 1)``."""
    g = torch.Generator().manual_seed(seed)
    n = n_prompts * group
    prompts = torch.randint(0, VOCAB, (n_prompts, prompt_len), generator=g).repeat_interleave(group, 0)
    completions = torch.randint(0, VOCAB, (n, completion_len), generator=g)
    lengths = torch.randint(2, completion_len + 1, (n,), generator=g)  # tokens before the padding
    pad = torch.arange(completion_len)[None, :] >= lengths[:, None]
    completions[pad] = 0
    input_ids = torch.cat([prompts, completions], 1)
    # position i of the shifted sequence predicts token i + 1: completion tokens are prompt_len .. end
    mask = torch.zeros(n, prompt_len + completion_len - 1, dtype=torch.bool)
    mask[:, prompt_len - 1 :] = ~pad
    rewards = torch.rand(n, generator=g).reshape(n_prompts, group)
    adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    advantages = adv.reshape(n, 1).expand(n, mask.shape[1]).contiguous()
    noise = 0.3 * torch.randn(mask.shape, generator=g)  # logp_old = logp + noise: some ratios clip
    return {"input_ids": input_ids, "mask": mask, "advantages": advantages, "noise": noise}


def token_log_probs(model, input_ids, temperature, *, backend=None, chunk_size=None):
    """Per-token ``(log_probs, entropy)`` of the next tokens, ``(B, L - 1)`` each, at ``temperature``,
    from the final hidden states and the output layer's weight: no (B, L, vocab) logits."""
    hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1]
    head = model.lm_head
    out = gx.linear_log_probs(
        hidden, head.weight, input_ids[:, 1:], head.bias, temperature=temperature, entropy=True, backend=backend,
        chunk_size=chunk_size,
    )  # fmt: skip
    return out.log_probs, out.entropy


def token_log_probs_torch(model, input_ids, temperature):
    """The same from materialised logits, as a trainer without gpuxent computes them."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    t = temperature[..., None] if isinstance(temperature, torch.Tensor) else temperature
    logp = torch.log_softmax(logits / t, -1)
    log_probs = logp.gather(-1, input_ids[:, 1:, None])[..., 0]
    entropy = -(logp.exp() * logp).sum(-1)
    return log_probs, entropy


def grpo_loss(log_probs, entropy, old_log_probs, advantages, mask, clip_eps=0.2, entropy_coef=0.01):
    """The clipped-ratio policy loss, each completion's mean over its tokens, then the mean over
    completions, minus ``entropy_coef`` times the masked mean entropy."""
    m = mask.to(log_probs.dtype)
    ratio = torch.exp(log_probs - old_log_probs)
    per_token = -torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    policy = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    return policy - entropy_coef * (entropy * m).sum() / m.sum()


def old_log_probs(model, batch, temperature):
    """The sampling policy's log-probs: the current model's (no gradient), perturbed by the batch's noise."""
    with torch.no_grad():
        lp, _ = token_log_probs(model, batch["input_ids"], temperature)
    return lp + batch["noise"].to(lp.dtype)


def grpo_step(model, batch, old, temperature=0.7, *, use_gpuxent=True, backend=None, chunk_size=None):
    """The step's loss, its gradients left in the parameters' ``.grad``."""
    if use_gpuxent:
        lp, ent = token_log_probs(model, batch["input_ids"], temperature, backend=backend, chunk_size=chunk_size)
    else:
        lp, ent = token_log_probs_torch(model, batch["input_ids"], temperature)
    dt = lp.dtype
    loss = grpo_loss(lp, ent, old.to(dt), batch["advantages"].to(dt), batch["mask"])
    loss.backward()
    return loss.detach()


def check(temperature=0.7):
    """Both ways in float64: ``(loss difference, largest gradient difference, loss)``."""
    batch = make_batch()
    results = []
    for use_gpuxent in (True, False):
        model = tiny_model(dtype=torch.float64)
        old = old_log_probs(model, batch, temperature)
        loss = grpo_step(model, batch, old, temperature, use_gpuxent=use_gpuxent)
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (l1, g1), (l2, g2) = results
    return float((l1 - l2).abs()), max(float((g1[n] - g2[n]).abs().max()) for n in g1), float(l1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--check", action="store_true", help="compare with materialised logits in float64")
    args = p.parse_args()
    if args.check:
        dl, dg, loss = check(args.temperature)
        print(f"float64 loss {loss:.6f}; |loss - torch's| = {dl:.2e}, max |grad - torch's| = {dg:.2e}")
        return
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        batch = make_batch(seed=step)
        old = old_log_probs(model, batch, args.temperature)
        opt.zero_grad()
        loss = grpo_step(model, batch, old, args.temperature)
        opt.step()
        print(f"step {step}: GRPO loss {loss.item():+.6f}")


if __name__ == "__main__":
    main()
