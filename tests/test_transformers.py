"""gpuxent.integrations.transformers: patched Transformers causal LMs against the same models unpatched.

Each family is built tiny from its config (no download). The patched and the unpatched model share one
state dict and one batch; the loss and every parameter gradient must agree. The models run in float64,
but the unpatched loss upcasts the logits with ``.float()``, i.e. rounds them to float32, so the
comparison uses float32's tolerances.
"""

import copy
import inspect
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from reference import assert_close

transformers = pytest.importorskip("transformers")

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
)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**LLAMA_LIKE),
    "mistral": lambda: transformers.MistralConfig(**LLAMA_LIKE),
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA_LIKE),
    "gemma2": lambda: transformers.Gemma2Config(
        **LLAMA_LIKE, head_dim=8, query_pre_attn_scalar=8, sliding_window=8, final_logit_softcapping=SOFTCAP
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.3,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ),
}  # fmt: skip
CLASS_PATCHES = {
    "llama": gx_hf.apply_gpuxent_to_llama,
    "mistral": gx_hf.apply_gpuxent_to_mistral,
    "qwen2": gx_hf.apply_gpuxent_to_qwen2,
    "gemma2": gx_hf.apply_gpuxent_to_gemma2,
    "gpt2": gx_hf.apply_gpuxent_to_gpt2,
}
FAMILIES = list(CONFIGS)


def build(family, rng):
    """A tiny randomly initialised model of the family, float64, in training mode."""
    torch.manual_seed(int(rng.integers(2**31)))
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="eager")
    return model.to(torch.float64).train()


def pair(family, rng, backend=None):
    model = build(family, rng)
    return model, gx_hf.apply_gpuxent(copy.deepcopy(model), backend=backend)


def batch(rng):
    """Token ids, an attention mask with right padding on the last row, labels with ignored positions."""
    input_ids = torch.as_tensor(rng.integers(0, VOCAB, (BATCH, SEQ)))
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


def assert_same_training(patched, model, inputs, **kwargs):
    """Patched and unpatched: the same loss and every parameter's gradient, and no logits from the patched."""
    out, grads = loss_and_grads(patched, inputs, **kwargs)
    ref_out, ref_grads = loss_and_grads(model, inputs, **kwargs)
    assert out.logits is None
    assert_close(out.loss, ref_out.loss, torch.float32, "loss")
    assert grads.keys() == ref_grads.keys()
    for name, ref_grad in ref_grads.items():
        assert grads[name] is not None, name
        assert_close(grads[name], ref_grad, torch.float32, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradients(family, rng):
    model, patched = pair(family, rng)
    if family in ("gpt2", "gemma2"):  # the head is the embedding: its gradient sums both uses
        assert patched.get_output_embeddings().weight is patched.get_input_embeddings().weight
    assert_same_training(patched, model, batch(rng))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("as_tensor", [True, False], ids=["tensor", "int"])
def test_num_items_in_batch(family, as_tensor, rng):
    """Gradient accumulation: the summed loss over the tokens of all micro-batches, as the Trainer passes it."""
    model, patched = pair(family, rng)
    inputs = batch(rng)
    num_items = int((inputs["labels"][:, 1:] != -100).sum()) * 3
    assert_same_training(patched, model, inputs, num_items_in_batch=torch.tensor(num_items) if as_tensor else num_items)


def test_gemma2_softcap_is_applied(rng):
    """The softcap changes the loss here (so the comparison above can tell), and the patched model follows it."""
    model, patched = pair("gemma2", rng)
    inputs = batch(rng)
    uncapped = copy.deepcopy(model)
    uncapped.config.final_logit_softcapping = None
    loss = patched(**inputs).loss
    assert abs(float(uncapped(**inputs).loss.detach()) - float(loss.detach())) > 1e-2
    assert_close(loss, model(**inputs).loss, torch.float32, "loss")


def test_shift_labels(rng):
    """Labels shifted by the caller (``shift_labels``, as for sequence parallelism) reach the loss as given."""
    model, patched = pair("llama", rng)
    inputs = batch(rng)
    shift_labels = torch.as_tensor(rng.integers(0, VOCAB, (BATCH, SEQ)))
    shift_labels[:, ::3] = -100
    assert_same_training(patched, model, inputs, shift_labels=shift_labels)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_never_materialised(family, rng):
    model, patched = pair(family, rng)
    inputs = batch(rng)
    seen = {}
    for name, m in [("unpatched", model), ("patched", patched)]:
        hook = lambda module, args, output, name=name: seen.setdefault(name, []).append(output.numel())
        handle = m.get_output_embeddings().register_forward_hook(hook)
        m(**inputs).loss.backward()
        handle.remove()
    assert seen["unpatched"] == [BATCH * SEQ * VOCAB]  # the hook sees the logits when there are any
    assert seen["patched"] == [0]


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_and_no_labels_unchanged(family, rng):
    """In eval mode (labels or not) and in training without labels the patched model returns its logits."""
    model, patched = pair(family, rng)
    inputs = batch(rng)
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    out, ref = patched(**no_labels), model(**no_labels)
    assert out.loss is None and torch.equal(out.logits, ref.logits)
    for m in (model, patched):
        m.eval()
    with torch.no_grad():
        out, ref = patched(**inputs), model(**inputs)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)


def test_return_dict_false(rng):
    """A tuple output loses its logits: ``(loss, *rest)``, as ``to_tuple`` drops a ``None`` field."""
    model, patched = pair("llama", rng)
    inputs = batch(rng)
    out, ref = patched(**inputs, return_dict=False), model(**inputs, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(ref) - 1
    assert_close(out[0], ref[0], torch.float32, "loss")
    assert torch.equal(ref[1], model(**inputs).logits)


@pytest.mark.parametrize("family", FAMILIES)
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


def test_custom_loss_function_is_respected(rng):
    """A model whose ``loss_function`` was replaced keeps it: the patch steps aside."""
    model, patched = pair("llama", rng)
    patched.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum() * 0 + 7
    out = patched(**batch(rng))
    assert float(out.loss.detach()) == 7 and out.logits is not None


def test_autocast(rng):
    """Mixed precision (float32 weights, bfloat16 autocast, as the Trainer's bf16=True): lm_head's casts."""
    model, patched = pair("llama", rng)
    model, patched = model.float(), patched.float()
    inputs = batch(rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = patched(**inputs), model(**inputs)
    out.loss.backward()
    ref.loss.backward()
    assert out.logits is None
    assert_close(out.loss, ref.loss, torch.bfloat16, "loss")
    for (name, p), ref_p in zip(patched.named_parameters(), model.parameters()):
        assert_close(p.grad, ref_p.grad, torch.bfloat16, name)


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
    inputs = batch(rng)
    out, ref = patched(**inputs), model(**inputs)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)


@pytest.mark.parametrize("bad", [torch.nn.Linear(2, 3), "llama"])
def test_unsupported_model(bad):
    with pytest.raises(TypeError, match="model: gpuxent patches LlamaForCausalLM"):
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
    """A subclass of a causal LM (here of LlamaForCausalLM) is patched as its base class is."""

    class MyLlama(transformers.LlamaForCausalLM):
        pass

    model = MyLlama(CONFIGS["llama"]()).to(torch.float64).train()
    patched = gx_hf.apply_gpuxent(copy.deepcopy(model))
    assert_same_training(patched, model, batch(rng))
