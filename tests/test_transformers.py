"""gpuxent.integrations.transformers: patched Transformers causal LMs against the same models unpatched.

Each family is built tiny from its config (no download; a family the installed Transformers lacks is
skipped). The patched and the unpatched model share one state dict and one batch; the loss and every
parameter gradient must agree. The models run in float64, but the unpatched loss upcasts the logits
with ``.float()``, i.e. rounds them to float32, so the comparison uses float32's tolerances.
"""

import copy
import inspect
import json
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from reference import assert_close

transformers = pytest.importorskip("transformers")

from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

import gpuxent as gx  # noqa: E402
from gpuxent.integrations import transformers as gx_hf  # noqa: E402

VOCAB = 96
BATCH, SEQ = 2, 12
SOFTCAP = 2.0  # small beside the logits (initializer_range below), so the tanh bends them
LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.3,  # logits of a few units, not the ~0.1 of the default 0.02
    pad_token_id=0,  # some defaults lie outside the tiny vocabulary
)
GEMMA_LIKE = dict(LLAMA_LIKE, head_dim=8, query_pre_attn_scalar=8, sliding_window=8)
# output_router_logits: the router's auxiliary loss is added to the loss, after loss_function
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0)
# family: (config class name, its tiny keywords)
CONFIGS = {
    "llama": ("LlamaConfig", LLAMA_LIKE),
    "mistral": ("MistralConfig", LLAMA_LIKE),
    "qwen2": ("Qwen2Config", LLAMA_LIKE),
    "qwen3": ("Qwen3Config", dict(LLAMA_LIKE, head_dim=8)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(
        LLAMA_LIKE, **MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16
    )),
    "qwen3_moe": ("Qwen3MoeConfig", dict(LLAMA_LIKE, **MOE, head_dim=8, num_experts=4, moe_intermediate_size=16)),
    "mixtral": ("MixtralConfig", dict(LLAMA_LIKE, **MOE, num_local_experts=4)),
    "gemma": ("GemmaConfig", dict(LLAMA_LIKE, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(GEMMA_LIKE, final_logit_softcapping=SOFTCAP)),
    "gemma3": ("Gemma3TextConfig", dict(GEMMA_LIKE, final_logit_softcapping=SOFTCAP)),
    "phi": ("PhiConfig", dict(LLAMA_LIKE, **NO_DROPOUT)),
    "phi3": ("Phi3Config", dict(LLAMA_LIKE, **NO_DROPOUT)),
    "gpt_neox": ("GPTNeoXConfig", dict(LLAMA_LIKE, hidden_dropout=0.0)),
    "opt": ("OPTConfig", dict(
        vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=32, ffn_dim=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, init_std=0.3, dropout=0.0, pad_token_id=1,
    )),
    "falcon": ("FalconConfig", dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.3,
        hidden_dropout=0.0, attention_dropout=0.0, pad_token_id=0,
    )),
    "stablelm": ("StableLmConfig", LLAMA_LIKE),
    "olmo2": ("Olmo2Config", LLAMA_LIKE),
    "granite": ("GraniteConfig", dict(LLAMA_LIKE, logits_scaling=3.0)),  # divides the logits
    "cohere": ("CohereConfig", dict(LLAMA_LIKE, logit_scale=0.37)),  # multiplies them
    "smollm3": ("SmolLM3Config", LLAMA_LIKE),
    "glm": ("GlmConfig", dict(LLAMA_LIKE, head_dim=8)),
    "gpt_oss": ("GptOssConfig", dict(LLAMA_LIKE, **MOE, head_dim=8, num_local_experts=4, sliding_window=8)),
    "gpt2": ("GPT2Config", dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.3,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )),
}  # fmt: skip
FAMILIES = list(CONFIGS)
MOE_FAMILIES = ["qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss"]
TRANSFORMED = ["gemma2", "gemma3", "granite", "cohere"]  # a softcap, a division, a multiplication
CLASS_PATCHES = {
    "llama": gx_hf.apply_gpuxent_to_llama,
    "mistral": gx_hf.apply_gpuxent_to_mistral,
    "qwen2": gx_hf.apply_gpuxent_to_qwen2,
    "gemma2": gx_hf.apply_gpuxent_to_gemma2,
    "gpt2": gx_hf.apply_gpuxent_to_gpt2,
}


def config(family):
    name, keywords = CONFIGS[family]
    if not hasattr(transformers, name):
        pytest.skip(f"Transformers {transformers.__version__} has no {name}")
    return getattr(transformers, name)(**keywords)


def build(family, rng):
    """A tiny randomly initialised model of the family, float64, in training mode."""
    torch.manual_seed(int(rng.integers(2**31)))
    implementations = dict(attn_implementation="eager")
    if family in MOE_FAMILIES:  # eager experts: the grouped matmul takes no float64
        implementations["experts_implementation"] = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config(family), **implementations)
    return model.to(torch.float64).train()


def pair(family, rng, backend=None):
    model = build(family, rng)
    return model, gx_hf.apply_gpuxent(copy.deepcopy(model), backend=backend, strict=True)


def batch(rng):
    """Token ids, an attention mask with right padding on the last row, labels with ignored positions."""
    input_ids = torch.as_tensor(rng.integers(2, VOCAB, (BATCH, SEQ)))
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    attention_mask[-1, -3:] = 0
    labels = input_ids.clone()
    labels[torch.as_tensor(rng.random((BATCH, SEQ)) < 0.3)] = -100
    labels[0, :2] = -100  # a masked prompt
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model, inputs, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **kwargs)
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


def head_rows(model):
    """Record the rows of every output the model's output embedding computes: ``(rows, handle)``."""
    rows = []
    hook = lambda module, args, output: rows.append(output.shape[:-1].numel())  # noqa: E731
    return rows, model.get_output_embeddings().register_forward_hook(hook)


def assert_same_training(patched, model, inputs, **kwargs):
    """Patched and unpatched: the same loss and every parameter's gradient, and no logits from the patched.

    Returns how many rows of logits the patched model's output embedding computed.
    """
    rows, handle = head_rows(patched)
    try:
        out, grads = loss_and_grads(patched, inputs, **kwargs)
    finally:
        handle.remove()
    ref_out, ref_grads = loss_and_grads(model, inputs, **kwargs)
    assert out.logits is None
    assert_close(out.loss, ref_out.loss, torch.float32, "loss")
    assert grads.keys() == ref_grads.keys()
    for name, ref_grad in ref_grads.items():
        assert (grads[name] is None) == (ref_grad is None), name
        if ref_grad is not None:
            assert_close(grads[name], ref_grad, torch.float32, name)
    return out, ref_out, sum(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_family(family, rng):
    """Every family trains as unpatched (loss, gradients, a router's auxiliary loss) and never forms the logits.

    The first fused call hands the output embedding a few probe rows (``PROBE_MAGNITUDES`` per sequence)
    to check the logit transforms; the next ones hand it none. Without labels, and in eval mode, the
    patched model returns what the unpatched one does.
    """
    model, patched = pair(family, rng)
    inputs = batch(rng)
    if family in ("gpt2", "gemma2", "gemma3", "cohere"):  # the head is the embedding: its gradient sums both uses
        assert patched.get_output_embeddings().weight is patched.get_input_embeddings().weight
    out, ref, rows = assert_same_training(patched, model, inputs)
    assert rows == BATCH * len(gx_hf.PROBE_MAGNITUDES) < BATCH * SEQ
    if family in MOE_FAMILIES:
        assert ref.aux_loss is not None and float(ref.aux_loss.detach()) > 0.1
        assert_close(out.aux_loss, ref.aux_loss, torch.float32, "aux_loss")
    # The next step: no logits at all; the Trainer's gradient accumulation (num_items_in_batch) on the way.
    num_items = torch.tensor(int((inputs["labels"][:, 1:] != -100).sum()) * 3)
    assert assert_same_training(patched, model, inputs, num_items_in_batch=num_items)[2] == 0
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    out, ref = patched(**no_labels), model(**no_labels)
    assert out.loss is None and torch.equal(out.logits, ref.logits)
    for m in (model, patched):
        m.eval()
    with torch.no_grad():
        out, ref = patched(**inputs), model(**inputs)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)


@pytest.mark.parametrize("family", TRANSFORMED)
def test_logit_transform_is_applied(family, rng):
    """The transform changes the loss here (so the comparison above can tell), and the patched model follows it."""
    model, patched = pair(family, rng)
    inputs = batch(rng)
    rows, handle = head_rows(model)
    raw = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, output: raw.append(output))
    loss = model(**inputs).loss
    hook.remove()
    handle.remove()
    untransformed = ForCausalLMLoss(raw[0], inputs["labels"], VOCAB)
    assert abs(float(untransformed.detach()) - float(loss.detach())) > 1e-2
    assert_close(patched(**inputs).loss, loss, torch.float32, "loss")


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])
def test_generate(family, rng):
    """``generate()`` after a fused training step: the same tokens as the unpatched model."""
    model, patched = pair(family, rng)
    inputs = batch(rng)
    patched(**inputs).loss.backward()
    prompt = inputs["input_ids"][:, :4]
    for m in (model, patched):
        m.eval()
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


def test_num_items_in_batch_int(rng):
    """Gradient accumulation with the number of items as a Python int (a custom trainer's)."""
    model, patched = pair("llama", rng)
    inputs = batch(rng)
    assert_same_training(patched, model, inputs, num_items_in_batch=int((inputs["labels"][:, 1:] != -100).sum()) * 3)


def test_shift_labels(rng):
    """Labels shifted by the caller (``shift_labels``, as for sequence parallelism) reach the loss as given."""
    model, patched = pair("llama", rng)
    inputs = batch(rng)
    shift_labels = torch.as_tensor(rng.integers(0, VOCAB, (BATCH, SEQ)))
    shift_labels[:, ::3] = -100
    assert_same_training(patched, model, inputs, shift_labels=shift_labels)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_return_dict_false(family, rng):
    """A tuple output loses its logits, as ``to_tuple`` drops a ``None`` field (the router's aux loss stays)."""
    model, patched = pair(family, rng)
    inputs = batch(rng)
    out, ref = patched(**inputs, return_dict=False), model(**inputs, return_dict=False)
    full = model(**inputs)
    assert isinstance(out, tuple) and len(out) == len(ref) - 1
    assert_close(out[0], ref[0], torch.float32, "loss")
    logits_at = next(i for i, item in enumerate(ref) if torch.equal(item, full.logits))
    for ours, theirs in zip(out, ref[:logits_at] + ref[logits_at + 1 :]):
        if torch.is_tensor(theirs):
            assert_close(ours, theirs, torch.float32, "output")


@pytest.mark.parametrize("family", list(CLASS_PATCHES))
def test_class_patch(family, rng, monkeypatch):
    """``apply_gpuxent_to_<family>()`` patches the class: a model built before the call trains fused."""
    model = build(family, rng)
    inputs = batch(rng)
    reference = copy.deepcopy(model)
    original = type(model).forward
    monkeypatch.setattr(type(model), "forward", original)  # restored after the test
    CLASS_PATCHES[family]()
    CLASS_PATCHES[family]()  # a second call replaces the patch, it does not wrap it again
    assert type(model).forward.gpuxent_original is original
    assert_same_training(model, reference, inputs)


def test_backend_is_passed_through(rng):
    model, patched = pair("llama", rng, backend="no_such_backend")
    with pytest.raises(ValueError, match="no_such_backend"):
        patched(**batch(rng))
    gx_hf.apply_gpuxent(patched, backend="numba_cpu")  # patching again replaces the backend
    assert_same_training(patched, model, batch(rng))


@pytest.mark.parametrize("backend_name", ["triton", "numba_cuda"])
def test_gpu_backend(backend_name, rng):
    """The GPU kernels (through their CPU interpreters here) give the unpatched loss and gradients too."""
    if backend_name not in gx.available_backends():
        pytest.skip(f"{backend_name} cannot run here")
    model, patched = pair("gpt2", rng, backend=backend_name)
    if torch.cuda.is_available():
        model, patched = model.cuda(), patched.cuda()
    inputs = {k: v.to(model.device) for k, v in batch(rng).items()}
    assert_same_training(patched, model, inputs)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_autocast(family, rng):
    """Mixed precision (float32 weights, bfloat16 autocast, as the Trainer's bf16=True): the head's casts."""
    model, patched = pair(family, rng)
    model, patched = model.float(), patched.float()
    inputs = batch(rng)
    for _ in range(2):  # the first call checks the softcap on its probe rows, in bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, ref = loss_and_grads(patched, inputs)[0], loss_and_grads(model, inputs)[0]
        assert out.logits is None
        assert_close(out.loss, ref.loss, torch.bfloat16, "loss")
        for (name, p), ref_p in zip(patched.named_parameters(), model.parameters()):
            assert_close(p.grad, ref_p.grad, torch.bfloat16, name)


def assert_unpatched(patched, model, inputs, match):
    """The patched model warns (naming the reason) and returns exactly what the unpatched one does."""
    with pytest.warns(UserWarning, match=match):
        out = patched(**inputs)
    ref = model(**inputs)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)


def test_custom_loss_function_is_respected(rng):
    """A model whose ``loss_function`` was replaced keeps it: the patch steps aside."""
    model, patched = pair("llama", rng)
    custom = lambda logits, labels, vocab_size, **kwargs: logits.sum() * 0 + 7  # noqa: E731
    for m in (model, patched):
        m.loss_function = custom
    with pytest.warns(UserWarning, match="its loss_function is"):
        gx_hf.apply_gpuxent(patched)
    assert_unpatched(patched, model, batch(rng), "LlamaForCausalLM trains unpatched: its loss_function is")
    with pytest.raises(gx_hf.UnsupportedModelError, match="its loss_function is"):
        gx_hf.apply_gpuxent(patched, strict=True)


def test_other_heads_run_unpatched(rng):
    """A head that is not a plain nn.Linear (here one that shifts the logits, like an adapter) is left to run."""

    class ShiftedHead(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 0.5 * x[..., :1]

    model, patched = pair("llama", rng)
    for m in (model, patched):
        head = ShiftedHead(m.config.hidden_size, VOCAB, bias=False, dtype=torch.float64)
        head.weight = m.lm_head.weight
        m.set_output_embeddings(head)
    with pytest.warns(UserWarning, match="ShiftedHead, not a plain nn.Linear"):
        gx_hf.apply_gpuxent(patched)
    assert_unpatched(patched, model, batch(rng), "ShiftedHead, not a plain nn.Linear")
    with pytest.raises(gx_hf.UnsupportedModelError, match="ShiftedHead, not a plain nn.Linear"):
        gx_hf.apply_gpuxent(patched, strict=True)


@pytest.mark.parametrize("strict", [False, True])
def test_unknown_logit_transform(strict, rng):
    """A transform the config does not describe (Cohere's scale changed on the model, not in its config).

    The first fused call finds it on its probe rows: that call, and every later one, runs unpatched with a
    warning; under ``strict=True`` it raises.
    """
    model, patched = pair("cohere", rng)
    gx_hf.apply_gpuxent(patched, strict=strict)
    for m in (model, patched):
        m.logit_scale = 0.8  # what the forward multiplies by; the config still says 0.37
    inputs = batch(rng)
    match = "a logit transform gpuxent does not know"
    if strict:
        with pytest.raises(gx_hf.UnsupportedModelError, match=match):
            patched(**inputs)
        return
    assert_unpatched(patched, model, inputs, match)
    assert_unpatched(patched, model, inputs, match)


def test_forward_without_loss_function(rng):
    """A model whose forward computes its loss itself (GPT-2's double heads): unpatched, with a warning."""
    model = transformers.GPT2DoubleHeadsModel(config("gpt2")).to(torch.float64).train()
    with pytest.warns(UserWarning, match="its forward does not call self.loss_function"):
        patched = gx_hf.apply_gpuxent(copy.deepcopy(model))
    inputs = batch(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = patched(**inputs)
    assert torch.equal(out.loss, model(**inputs).loss)
    with pytest.raises(gx_hf.UnsupportedModelError, match="does not call self.loss_function"):
        gx_hf.apply_gpuxent(model, strict=True)


@pytest.mark.parametrize("bad", [torch.nn.Linear(2, 3), "llama"])
def test_unsupported_model(bad):
    with pytest.raises(TypeError, match="model: gpuxent patches Transformers causal LMs"):
        gx_hf.apply_gpuxent(bad)


def test_base_model_is_not_a_causal_lm(rng):
    with pytest.raises(TypeError, match="got LlamaModel"):
        gx_hf.apply_gpuxent(build("llama", rng).model)


def run_python(*args):
    """``python *args`` in a fresh process that imports what this one does; its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, *args], env=env, check=True, stdout=subprocess.PIPE, text=True).stdout


def test_import_gpuxent_does_not_import_transformers():
    run_python("-c", "import sys, gpuxent, gpuxent.integrations; assert 'transformers' not in sys.modules")


def test_example_hf_tiny_llama():
    """examples/hf_tiny_llama.py at tiny sizes: both variants train on the same batches to the same losses."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "hf_tiny_llama.py")
    sizes = ["--hidden=32", "--layers=1", "--vocab=300", "--batch=2", "--seq=16", "--warmup=1", "--steps=1"]
    result = json.loads(run_python(script, *sizes, "--json").splitlines()[-1])
    unpatched, fused = result["rows"]
    assert (unpatched["variant"], fused["variant"]) == ("unpatched", "gpuxent")
    assert len(fused["losses"]) == 3 and result["max_loss_difference"] < 1e-4
    assert all(row["peak_step_mib"] > 0 and row["median_step_s"] > 0 for row in result["rows"])


def test_threads_share_one_patched_model(rng):
    """One patched model, two threads: one trains on labels while the other runs without (as generation does).

    Each call keeps its own state: the thread without labels gets the unpatched logits, never the empty slice
    the training call hands the head, and the training call the unpatched loss.
    """
    model, patched = pair("llama", rng)
    inputs = batch(rng)
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    ref_loss, ref_logits = model(**inputs).loss.detach(), model(**no_labels).logits.detach()
    errors = []
    start = threading.Barrier(2)

    def run(step):
        try:
            start.wait()
            for _ in range(40):
                step()
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    def train():
        out = patched(**inputs)
        assert out.logits is None
        assert_close(out.loss, ref_loss, torch.float32, "loss")

    def infer():
        assert torch.equal(patched(**no_labels).logits, ref_logits)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=run, args=(step,)) for step in (train, infer)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors


def test_labels_passed_positionally(rng):
    """``model(ids, None, None, None, None, labels)``: bound by the forward's own signature, as unpatched."""
    model, patched = pair("llama", rng)
    inputs = batch(rng)
    ids, labels = inputs["input_ids"], inputs["labels"]
    positional = list(inspect.signature(type(model).forward).parameters)[1:].index("labels")
    args = [ids] + [None] * (positional - 1) + [labels]
    model.zero_grad(set_to_none=True)
    ref = model(*args)
    ref.loss.backward()
    out = patched(*args)
    out.loss.backward()
    assert out.logits is None
    assert_close(out.loss, ref.loss, torch.float32, "loss")
    for (name, p), ref_p in zip(patched.named_parameters(), model.parameters()):
        assert_close(p.grad, ref_p.grad, torch.float32, name)


def test_subclass(rng):
    """Subclasses of a causal LM are patched as their base class is: one as is, one whose forward delegates."""

    class MyLlama(transformers.LlamaForCausalLM):
        pass

    class Delegating(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    for cls in (MyLlama, Delegating):
        model = cls(config("llama")).to(torch.float64).train()
        patched = gx_hf.apply_gpuxent(copy.deepcopy(model), strict=True)
        assert_same_training(patched, model, batch(rng))


def test_fsdp2(rng, tmp_path):
    """FSDP2 (``fully_shard``, one gloo process here): patched before or after sharding, the unsharded loss and
    gradients; a head sharded on its own (its weight whole only within its own call) runs unpatched."""
    dist = pytest.importorskip("torch.distributed")
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not dist.is_available() or not hasattr(fsdp, "fully_shard"):
        pytest.skip("no FSDP2 here")
    model = build("llama", rng)
    inputs = batch(rng)
    ref_out, ref_grads = loss_and_grads(model, inputs)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for order in ("before", "after", "head on its own"):
            sharded = copy.deepcopy(model)
            if order == "before":
                gx_hf.apply_gpuxent(sharded, strict=True)
            for layer in sharded.model.layers:
                fsdp.fully_shard(layer)
            if order == "head on its own":
                fsdp.fully_shard(sharded.lm_head)
            fsdp.fully_shard(sharded)
            if order == "head on its own":
                with pytest.warns(UserWarning, match="FSDP2 shards its output embedding on its own"):
                    gx_hf.apply_gpuxent(sharded)
            elif order == "after":
                gx_hf.apply_gpuxent(sharded, strict=True)
            for _ in range(2):  # the probing call, then a plain one
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out, grads = loss_and_grads(sharded, inputs)
                assert (out.logits is None) == (order != "head on its own"), order
                assert_close(out.loss, ref_out.loss, torch.float32, f"{order}: loss")
                for name, ref_grad in ref_grads.items():
                    grad = grads[name].full_tensor() if hasattr(grads[name], "full_tensor") else grads[name]
                    assert_close(grad, ref_grad, torch.float32, f"{order}: {name}")
    finally:
        dist.destroy_process_group()
