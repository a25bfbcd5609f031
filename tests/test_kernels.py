"""lrpretrain/kernels: each fused kernel against its PyTorch reference, forward and backward, and
``trainer.kernels`` through the trainer and the CLI.

Without a GPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before anything imports them), in fp32 and fp16 (the interpreter computes bf16 wrongly): small shapes
that are not multiples of the kernels' blocks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_errors import one_line

from lrpretrain import kernels
from lrpretrain.kernels import adam, head_loss, lowrank_act, sparse_lowrank, triton_support
from lrpretrain.model import lm_loss
from lrpretrain.optim import AdamW, quant8
from lrpretrain.optim.bf16 import Bf16Update, rounding_bits

from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")
INTERPRETED = triton_support.interpreting() or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not INTERPRETED, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    """Equal up to ``rtol`` of b's largest magnitude (the scale of fp32/fp16 rounding in a reduction)."""
    a, b = a.float(), b.float()
    assert a.shape == b.shape
    err = float((a - b).abs().max())
    assert err <= rtol * float(b.abs().max().clamp(min=1e-30)), (err, float(b.abs().max()))


# -- the LM head loss --------------------------------------------------------------------------------------


def _head_case(B=3, T=37, d=48, V=301, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, generator=g).to(dtype).requires_grad_()
    W = (0.1 * torch.randn(V, d, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 20:] = -100  # padding after a document's end
    labels[2] = -100  # a row without any target
    return h, W, labels


def _grads(fn, h, W, labels, scale=0.37):
    h.grad = W.grad = None
    loss = fn(h, W, labels)
    (loss * scale).backward()
    return loss.detach(), h.grad, W.grad


def test_chunk_rows_bounds_the_logits_by_the_hidden_states():
    assert head_loss.chunk_rows(4096, 32000, 512) == 128  # llama_60m, 16 x 256 tokens: 32 chunks
    for n, v, d in [(1, 10, 4), (37, 301, 48), (5000, 32000, 2048)]:
        rows = head_loss.chunk_rows(n, v, d)
        assert rows & (rows - 1) == 0 and rows * v <= 2 * max(n, 1) * d + 2 * v


def test_chunked_loss_equals_the_reference_with_padding():
    """fp32: loss and both gradients as lm_loss on the whole logits computes them; chunks of 16 rows
    over 111 tokens (the last chunk partial), -100 targets (a padded tail, a row without targets)."""
    h, W, labels = _head_case()
    assert head_loss.chunk_rows(h.shape[0] * h.shape[1], W.shape[0], h.shape[2]) == 16
    ref = _grads(lambda h, W, y: lm_loss(F.linear(h, W), y)[0], h, W, labels)
    assert torch.equal(head_loss.reference_head_loss(h, W, labels), ref[0])
    got = _grads(head_loss.chunked_head_loss, h, W, labels)
    for a, b in zip(got, ref):
        close(a, b, 1e-5)
    assert got[1][2].abs().max() == 0  # no target, no gradient
    with torch.no_grad():  # evaluation: the loss alone
        assert torch.allclose(head_loss.chunked_head_loss(h, W, labels), ref[0], rtol=1e-5)


def test_chunked_loss_backward_twice_on_a_retained_graph():
    """The exact global clip of per-layer updates runs the backward twice (retain_graph): the kept
    gradients must not be scaled in place."""
    h, W, labels = _head_case(seed=1)
    loss = head_loss.chunked_head_loss(h, W, labels) * 0.5
    loss.backward(retain_graph=True)
    first = h.grad.clone(), W.grad.clone()
    loss.backward()
    assert torch.equal(h.grad, 2 * first[0]) and torch.equal(W.grad, 2 * first[1])


@pytest.mark.parametrize("mode", ["autocast", "pure_bf16"])
def test_chunked_loss_in_bf16(mode):
    """bf16 matmuls (autocast over fp32 tensors, or bf16 tensors), fp32 log-softmax per chunk: the
    reference's loss and gradients to bf16 accuracy, gradients in the tensors' dtypes."""
    h, W, labels = _head_case(seed=2, dtype=torch.float32 if mode == "autocast" else torch.bfloat16)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else torch.enable_grad()
    with ctx:
        ref = _grads(lambda h, W, y: lm_loss(F.linear(h, W), y)[0], h, W, labels)
    with ctx:
        got = _grads(head_loss.chunked_head_loss, h, W, labels)
    assert got[0].dtype == torch.float32 and got[1].dtype == h.dtype and got[2].dtype == W.dtype
    for a, b in zip(got, ref):
        close(a, b, 3e-2)


@needs_triton
def test_liger_loss_equals_the_reference():
    if head_loss.liger_refusal():
        pytest.skip(head_loss.liger_refusal())
    h, W, labels = _head_case(seed=3)
    ref = _grads(lambda h, W, y: lm_loss(F.linear(h, W), y)[0], h, W, labels)
    got = _grads(head_loss.liger_head_loss, h, W, labels)
    for a, b in zip(got, ref):
        close(a, b, 1e-5)


def test_every_method_model_goes_through_the_head_loss_seam():
    """The models of every method (a plain LLaMA, CoLA's blocks, CR-Net's rewired decoder, SLTrain's
    modules) give the same loss and gradients with the head loss as with their logits."""
    from lrpretrain.methods import get_method
    from lrpretrain.model import build_model
    from lrpretrain.train import load_config

    for name in ("full", "cola", "crnet", "sltrain"):
        rank = [] if name == "full" else ["method.rank=8"]
        cfg, _ = load_config(["model=llama_tiny", f"method={name}", *rank])
        torch.manual_seed(0)
        model = get_method(name)(cfg.method, cfg.model).prepare_model(build_model(cfg.model))
        ids = torch.randint(0, cfg.model.vocab_size, (2, 24))
        labels = ids.clone()
        labels[1, 15:] = -100
        results = []
        for fused in (False, True):
            model.zero_grad()
            loss = (model(ids, labels=labels, head_loss=head_loss.chunked_head_loss) if fused
                    else lm_loss(model(ids), labels)[0])
            loss.backward()
            results.append([loss.detach(), *(p.grad.clone() for p in model.parameters())])
        for a, b in zip(*results):
            close(a, b, 1e-4)


# -- SLTrain -----------------------------------------------------------------------------------------------


def _sparse_case(m, n, r, T, density, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, n, generator=g).to(dtype).requires_grad_()
    A = (torch.randn(r, n, generator=g) / n**0.5).to(dtype).requires_grad_()
    B = torch.randn(m, r, generator=g).to(dtype).requires_grad_()
    nnz = int(density * m * n)
    index = torch.randperm(m * n, generator=g)[:nnz].sort().values
    values = torch.randn(nnz, generator=g).to(dtype).requires_grad_()
    return x, A, B, values, index


@needs_triton
@pytest.mark.parametrize("m,n,r,T,density,dtype", [(37, 29, 5, 19, 0.1, torch.float32),
                                                    (70, 45, 7, 33, 0.03, torch.float32),
                                                    (33, 50, 4, 21, 0.2, torch.float16)])
def test_sparse_lowrank_kernel_equals_the_reference(m, n, r, T, density, dtype):
    """Forward and every gradient (x, A, B, the support's values) of the Triton op against the dense
    rebuild, on shapes off the kernels' blocks, with rows and columns of S that hold no entry."""
    x, A, B, values, index = _sparse_case(m, n, r, T, density, dtype)
    layout = sparse_lowrank.support_layout(index, m, n)
    cot = torch.randn(2, T, m, generator=torch.Generator().manual_seed(9)).to(dtype)
    outs = []
    for fn in (lambda: sparse_lowrank.SparseLowRankFunction.apply(x, A, B, values, index, 0.25, 7),
               lambda: sparse_lowrank.sparse_lowrank_triton(x, A, B, values, index, 0.25, layout)):
        for t in (x, A, B, values):
            t.grad = None
        y = fn()
        (y.float() * cot.float()).sum().backward()
        outs.append([y.detach(), x.grad, A.grad, B.grad, values.grad])
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    for got, ref in zip(outs[1], outs[0]):
        close(got, ref, tol)


def test_support_layout_is_remade_when_the_index_changes():
    _, _, _, _, index = _sparse_case(20, 30, 3, 4, 0.2, torch.float32)
    lay = sparse_lowrank.support_layout(index, 20, 30)
    assert sparse_lowrank.support_layout(index, 20, 30, lay) is lay
    rows = index // 30
    assert torch.equal(lay.row_ptr[1:] - lay.row_ptr[:-1], torch.bincount(rows, minlength=20).int())
    cols = (index % 30)[lay.perm.long()]
    assert torch.equal(cols, cols.sort().values)
    index.copy_(torch.randperm(600)[: index.numel()].sort().values)  # a checkpoint loaded into the buffer
    assert sparse_lowrank.support_layout(index, 20, 30, lay) is not lay


# -- CoLA --------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("n,m,r,T,dtype", [(45, 38, 13, 21, torch.float32), (70, 33, 40, 50, torch.float16)])
def test_cola_kernels_equal_the_reference(n, m, r, T, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, T, n, generator=g).to(dtype).requires_grad_()
    A = (torch.randn(r, n, generator=g) / n**0.5).to(dtype).requires_grad_()
    B = (torch.randn(m, r, generator=g) / r**0.5).to(dtype).requires_grad_()
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    for fused, ref, args in ((lowrank_act.cola_linear, lowrank_act.cola_linear_reference, (x, A, B)),
                             (lowrank_act.cola_encode, lowrank_act.cola_encode_reference, (x, A))):
        outs = []
        for fn in (ref, fused):
            for t in args:
                t.grad = None
            y = fn(*args)
            cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
            (y.float() * cot.float()).sum().backward()
            outs.append([y.detach(), *(t.grad for t in args)])
        for got, want in zip(outs[1], outs[0]):
            close(got, want, tol)


@needs_triton
def test_cola_kernel_keeps_the_preactivation_not_the_activation():
    """The fused layer keeps x and A·x (r values per token); the reference also keeps σ(A·x)."""
    from lrpretrain.methods.toolkit import saved_activation_bytes

    x = torch.randn(64, 32, requires_grad=True)
    A, B = torch.randn(8, 32, requires_grad=True), torch.randn(24, 8, requires_grad=True)
    holder = torch.nn.Module()
    holder.A, holder.B = torch.nn.Parameter(A.detach()), torch.nn.Parameter(B.detach())
    _, ref = saved_activation_bytes(holder, lambda: lowrank_act.cola_linear_reference(x, holder.A, holder.B))
    _, got = saved_activation_bytes(holder, lambda: lowrank_act.cola_linear(x, holder.A, holder.B))
    assert ref - got == 64 * 8 * 4


# -- the optimizer step ----------------------------------------------------------------------------------


def _constants(form="adamw", wd=0.1, step=3):
    b1, b2, lr, eps = 0.9, 0.95, 1e-2, 1e-8
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    if form == "adamw":
        return {"form": form, "lerp_weight": 1 - b1, "beta2": b2, "c2": 1 - b2, "eps": eps,
                "decay": 1 - lr * wd if wd else None, "step": -lr / bc1, "denom_scale": math.sqrt(bc2)}
    return {"form": form, "lerp_weight": 1 - b1, "beta2": b2, "c2": 1 - b2, "eps": eps,
            "decay": 1 - lr * wd if wd else None, "step": -lr * math.sqrt(bc2) / bc1, "denom_scale": 1.0}


def _adam_inputs(n, q8, w_dtype, g_dtype, rule, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g).to(w_dtype)
    grad = (0.1 * torch.randn(n, generator=g)).to(g_dtype)
    m, v = 0.01 * torch.randn(n, generator=g), 1e-3 * torch.rand(n, generator=g)
    kw: dict = {}
    if q8:
        qm, qv = quant8.qmap(True, torch.device("cpu")), quant8.qmap(False, torch.device("cpu"))
        (kw["m_codes"], kw["m_absmax"]), (kw["v_codes"], kw["v_absmax"]) = (adam.quantize_reference(m, qm),
                                                                            adam.quantize_reference(v, qv))
        kw["qmap_m"], kw["qmap_v"] = qm, qv
    else:
        kw["m"], kw["v"] = m, v
    if rule is not None:
        kw["rule"] = rule
    if rule == "stochastic":
        kw["bits"] = rounding_bits(1234, 777, n, "cpu")
    if rule == "kahan":
        kw["comp"] = (1e-3 * torch.randn(n, generator=g)).to(torch.bfloat16)
    return w, grad, kw


def _clone(kw):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@needs_triton
@pytest.mark.parametrize("n,q8,w_dtype,g_dtype,rule,form", [
    (3000, False, torch.float32, torch.float32, None, "adamw"),
    (2049, False, torch.float32, torch.float32, None, "direction"),
    (1000, True, torch.float32, torch.float32, None, "adamw"),  # 4 blocks of 256, the last partial
    (1500, False, torch.bfloat16, torch.bfloat16, "stochastic", "adamw"),
    (1300, True, torch.bfloat16, torch.bfloat16, "nearest", "direction"),
    (1100, False, torch.bfloat16, torch.float32, "kahan", "adamw"),
])
def test_fused_adam_step_equals_its_reference_bit_for_bit(n, q8, w_dtype, g_dtype, rule, form):
    """The kernel and its PyTorch reference give the same bits: weights (rounded to bf16 with the same
    random bits), moments, 8-bit codes and absmax, the Kahan compensation."""
    w, grad, kw = _adam_inputs(n, q8, w_dtype, g_dtype, rule)
    c = _constants(form)
    w2, kw2 = w.clone(), _clone(kw)
    adam.fused_adam_step(w, grad, c, **kw)
    adam.reference_adam_step(w2, grad, c, **kw2)
    assert torch.equal(w.view(torch.int16) if w.dtype == torch.bfloat16 else w,
                       w2.view(torch.int16) if w2.dtype == torch.bfloat16 else w2)
    for k, t in kw.items():
        if isinstance(t, torch.Tensor) and k not in ("bits", "qmap_m", "qmap_v"):
            assert torch.equal(t.view(torch.int16) if t.dtype == torch.bfloat16 else t,
                               kw2[k].view(torch.int16) if t.dtype == torch.bfloat16 else kw2[k]), k


def test_reference_quantiser_is_the_nearest_code():
    """bitsandbytes' CUDA binary search, in PyTorch: the nearest code of x / absmax for every entry not
    at a midpoint; all-zero blocks get code 0 and absmax 0."""
    x = torch.randn(1000) * torch.logspace(-6, 0, 1000)
    x[512:768] = 0
    for signed in (True, False):
        y = x if signed else x.abs()
        q = quant8.qmap(signed, torch.device("cpu"))
        codes, absmax = adam.quantize_reference(y, q)
        assert absmax[2] == 0 and (codes[512:768] == 0).all()
        scaled = (y.view(-1, 1)[:1000] / absmax.repeat_interleave(256)[:1000, None].clamp(min=1e-30))
        nearest = (scaled - q[None, :]).abs().argmin(1)
        live = absmax.repeat_interleave(256)[:1000] > 0
        d_got = (scaled[:, 0] - q[codes.long()]).abs()
        d_best = (scaled[:, 0] - q[nearest]).abs()
        assert torch.allclose(d_got[live], d_best[live], atol=1e-7)


def _ulps_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@needs_triton
@pytest.mark.parametrize("case", ["fp32", "galore_dense", "loro_dense", "pure_bf16_stochastic", "pure_bf16_kahan",
                                  "8bit"])
def test_optimizer_with_the_fused_step_equals_the_pytorch_step(case):
    """Through ParamwiseOptimizer.elementwise_step (pieces of CHUNK entries, the trainer's hook), three
    steps: the moments m, v as the PyTorch step's; the weights to an fp32 ulp (PyTorch's CPU square root
    is not correctly rounded, the kernel's is), so bf16 weights round to the same bits but where an ulp
    moved the rounding (at most 1 in 1000 here, by one bf16 ulp). With 8-bit states the codes are
    bitsandbytes' CUDA quantiser's (its CPU one rounds through a 65536-bin lookup table, coarser near 0):
    the weights then agree to a fraction of the steps' size."""
    from lrpretrain.optim import base

    results = []
    for fused in (None, adam.fused_adam_step):
        torch.manual_seed(0)
        pure = case.startswith("pure_bf16")
        dtype = torch.bfloat16 if pure else torch.float32
        params = [torch.nn.Parameter(torch.randn(70, 90).to(dtype)), torch.nn.Parameter(torch.randn(33).to(dtype))]
        if case == "galore_dense":
            from lrpretrain.optim.galore import GaLoreAdamW

            opt = GaLoreAdamW([{"params": params}], lr=1e-2, weight_decay=0.1)
        elif case == "loro_dense":  # LOROAdamW's Adam (the reference's form) of its non-factor parameters
            from lrpretrain.optim.loro import LOROAdamW

            opt = LOROAdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        else:
            opt = AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_bits=8 if case == "8bit" else 32)
        if pure:
            opt.bf16_update = Bf16Update(case.split("_")[-1], seed=3)
        opt.fused_adam = fused
        chunk = base.CHUNK
        base.CHUNK = 2048  # several pieces, the last partial
        try:
            for step in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).to(dtype)
                opt.step()
        finally:
            base.CHUNK = chunk
        results.append((params, opt))
    (p_ref, o_ref), (p_got, o_got) = results
    for pa, pb in zip(p_got, p_ref):
        a, b = pa.detach(), pb.detach()
        if a.dtype == torch.bfloat16:
            ulps = _ulps_bf16(a, b)
            assert ulps.max() <= 1 and (ulps > 0).float().mean() <= 1e-3
        elif case == "8bit":  # a code step of a moment moves an update (at most lr = 1e-2) by a fraction
            assert float((a - b).abs().max()) <= 0.25 * 3 * 1e-2
        else:
            close(a, b, 2e-7)
        sa, sb = o_got.state[pa], o_ref.state[pb]
        for k in ("exp_avg", "exp_avg_sq"):  # fp32 moments (8-bit: compared through the weights above)
            if k in sb:
                close(sa[k], sb[k], 1e-6)
        if "bf16_comp" in sb:  # Kahan: the same rounding errors but where a weight rounded the other way
            assert (sa["bf16_comp"] != sb["bf16_comp"]).float().mean() <= 1e-3
        step = "step" if "step" in sb else "adam_step"
        assert sa.get("bf16_updates") == sb.get("bf16_updates") and int(sa[step]) == int(sb[step])


def test_stochastic_rounding_kernel_path_uses_the_positional_bits():
    """The bits a fused piece gets are those Writer.store uses for the same entries (a function of the
    position in the whole tensor, whatever the piece)."""
    from lrpretrain.optim.bf16 import _mix

    upd = Bf16Update("stochastic", seed=5)
    w = torch.zeros(3000, dtype=torch.bfloat16)
    writer = upd.writer({}, w, slot=2)
    a = writer.kernel_args(slice(1000, 3000))["bits"]
    assert torch.equal(a, rounding_bits(_mix(5, 2, 0), 0, 3000, "cpu")[1000:])


# -- trainer.kernels ---------------------------------------------------------------------------------------


def test_choice_and_the_refusal(monkeypatch):
    assert kernels.choose("torch", cuda=True) == kernels.KernelChoice(False, "full")
    assert kernels.choose("auto", cuda=False) == kernels.KernelChoice(False, "chunked")
    assert kernels.choose("auto", cuda=True, check=False) == kernels.KernelChoice(True, "liger")
    assert kernels.choose("triton", cuda=False) == kernels.KernelChoice(True, "liger")
    assert kernels.refusal("auto", cuda=False) is None and kernels.refusal("torch", cuda=False) is None
    monkeypatch.setattr(triton_support, "INTERPRET_AT_IMPORT", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = kernels.refusal("triton", cuda=False)
    assert why.startswith("trainer.kernels=triton cannot run here") and "TRITON_INTERPRET=1" in why
    assert "\n" not in why and kernels.refusal("triton", cuda=True) is None or head_loss.liger_refusal()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set after import: too late for Triton
    assert "before starting the process" in kernels.refusal("triton", cuda=False)
    monkeypatch.setattr(head_loss, "liger_refusal", lambda: "liger-kernel cannot be imported (test)")
    monkeypatch.setattr(kernels, "liger_refusal", head_loss.liger_refusal)
    monkeypatch.setattr(kernels, "triton_refusal", lambda cuda: None)
    assert kernels.choose("auto", cuda=True).head_loss == "chunked" and "chunked" in kernels.choose("auto", True).note


def test_triton_without_cuda_or_the_interpreter_is_one_line(cli, tmp_path, monkeypatch):
    """Through the CLI, before anything is built or written; a bad value of the key too."""
    monkeypatch.setattr(triton_support, "INTERPRET_AT_IMPORT", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    run = tmp_path / "run"
    one_line(cli("train", *TINY, f"run.dir={run}", "trainer.device=cpu", "trainer.kernels=triton"),
             "trainer.kernels=triton cannot run here: Triton kernels launch on CUDA only")
    assert not run.exists()
    one_line(cli("train", *TINY, f"run.dir={run}", "trainer.kernels=cuda"),
             "trainer.kernels='cuda' is invalid: allowed: auto, torch, triton")


def test_kernels_torch_is_the_plain_path_and_auto_on_the_cpu_chunks_the_loss(corpus, tmp_path):
    """trainer.kernels=torch: the loss from the model's logits and the PyTorch optimizer step, the code
    path of lrpretrain before the kernels, bit for bit (the same ops); auto on the CPU: the chunked loss
    (same loss and gradients to fp32 accuracy) and still the PyTorch step."""
    from lrpretrain.train import build_trainer, load_config

    grads = {}
    for choice in ("torch", "auto"):
        cfg, resolved = load_config(["model=llama_tiny", "data=embedded", "data.seq_len=64", "trainer.batch_size=2",
                                     "trainer.micro_batch_size=2", "trainer.precision=fp32", f"trainer.kernels={choice}",
                                     "logging.progress=none", "data.val_tokens=0", "trainer.eval_at_start=false",
                                     f"run.dir={tmp_path / choice}"])
        trainer = build_trainer(cfg, resolved)
        try:
            assert trainer.optimizer.fused_adam is None
            batch = next(trainer.data)
            trainer.model.zero_grad()
            loss = trainer._loss(batch)
            loss.backward()
            grads[choice] = [loss.detach(), *(p.grad.clone() for p in trainer.model.parameters())]
            if choice == "torch":
                assert trainer.head_loss is None
                trainer.model.zero_grad()
                plain = lm_loss(trainer.model(batch.input_ids), batch.labels)[0]
                plain.backward()
                assert torch.equal(plain, loss)
                assert all(torch.equal(p.grad, g) for p, g in zip(trainer.model.parameters(), grads["torch"][1:]))
            else:
                assert trainer.head_loss is head_loss.chunked_head_loss
        finally:
            trainer.data.close()
            trainer.logger.close()
    for a, b in zip(grads["auto"], grads["torch"]):
        close(a, b, 1e-5)


# -- training through the CLI ------------------------------------------------------------------------------


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("extra", [
    # liger's loss and the Adam step with 8-bit moments and stochastic rounding into bf16 weights
    ["method=full", "optim.state_bits=8", "trainer.precision=pure_bf16"],
    ["method=sltrain", "method.rank=8", "method.targets=[mlp]"],  # the sparse op
    ["method=cola", "method.rank=8"],  # the fused CoLA layer
    ["method=cola_m", "method.rank=8", "method.targets=[attn]"],  # the encode kernel in CoLA-M's segments
], ids=["full_8bit_pure_bf16", "sltrain", "cola", "cola_m"])
def test_training_with_the_kernels_through_the_cli(cli, tmp_path, extra):
    """A small llama (dim 64, tied embeddings, 2 x 32 tokens), 2 updates with trainer.kernels=triton against
    the same run with torch: the same losses to the precision's accuracy."""
    from conftest import losses

    small = ["model.dim=64", "model.ffn_dim=172", "model.n_heads=2", "model.tie_embeddings=true", "data.seq_len=32",
             "trainer.batch_size=2", "trainer.micro_batch_size=2", "trainer.max_steps=2", "trainer.ckpt_every=0",
             "data.val_tokens=0"]
    runs = {}
    for k in ("torch", "triton"):
        run = tmp_path / k
        res = cli("train", *TINY, *small, *extra, f"trainer.kernels={k}", f"run.dir={run}")
        assert res.code == 0, res.err
        assert f"kernels {k}" in res.err
        runs[k] = losses(run)
    assert "kernels triton (loss: liger)" in res.err
    tol = 2e-2 if "trainer.precision=pure_bf16" in extra else 1e-4
    assert len(runs["triton"]) == 2 and all(math.isfinite(x) for x in runs["triton"].values())
    for step, loss in runs["torch"].items():
        assert abs(runs["triton"][step] - loss) <= tol * abs(loss), (step, runs)
