"""model.py against independent references: HF transformers' GPT2LMHeadModel (eager attention, fp32),
F.cross_entropy, closed-form parameter and FLOP counts."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GPT2Config, GPT2LMHeadModel

from model import GPT, GPTConfig

SMALL = dict(n_layer=3, n_head=4, n_embd=64)  # tiny but with several layers, so layer_idx scaling shows


def randomize_(module, generator):
    """Every parameter random and O(0.1–1), so that a misplaced bias, LayerNorm weight or transpose
    changes the logits (fresh inits have zero biases and unit LayerNorm weights)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.1 * noise if name.endswith("ln_1.weight") or name.endswith("ln_2.weight")
                    or name.endswith("ln_f.weight") else 0.1 * noise)


def hf_reference(scale_attn_by_inverse_layer_idx, vocab_size=50257, n_positions=64):
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, **SMALL,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        scale_attn_by_inverse_layer_idx=scale_attn_by_inverse_layer_idx,
                        attn_implementation="eager")
    hf = GPT2LMHeadModel(config)
    randomize_(hf, torch.Generator().manual_seed(0))
    return hf.eval()


def assert_logits_close(ours, theirs):
    # fp32 round-off: different matmul orders and SDPA vs eager softmax, nothing more
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * max(scale, 1.0))


@pytest.mark.parametrize("scale_attn_by_inverse_layer_idx", [False, True])
def test_from_hf_logits_match_hf(scale_attn_by_inverse_layer_idx):
    hf = hf_reference(scale_attn_by_inverse_layer_idx)
    ours = GPT.from_hf(hf).eval()
    assert ours.config.vocab_size == 50257 and ours.config.bias
    assert ours.config.scale_attn_by_inverse_layer_idx == scale_attn_by_inverse_layer_idx
    idx = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(idx).logits
        logits, loss = ours(idx)
    assert loss is None
    assert logits.shape == (2, 48, 50257)
    assert_logits_close(logits, theirs)


def attention_by_hand(attn, x, scale):
    """Causal self-attention written out: softmax(q·kᵀ·scale + causal mask)·v, then the output projection."""
    B, T, C = x.shape
    H = attn.n_head
    q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))  # (B, H, T, D)
    scores = q @ k.transpose(-2, -1) * scale  # (B, H, T, T)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v  # (B, H, T, D)
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))


def test_layer_scaling_divides_each_layers_scores_by_its_index():
    # the flag must really reach attention: the same weights with and without it disagree
    hf = hf_reference(False)
    plain = GPT.from_hf(hf).eval()
    scaled = GPT(GPTConfig(block_size=64, vocab_size=50257, bias=True, scale_attn_by_inverse_layer_idx=True,
                           **SMALL)).eval()
    scaled.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (plain(idx)[0] - scaled(idx)[0]).abs().max() > 1e-3
    # and it is GPT-2's formula: block i scores q·k / sqrt(head_dim) / (i + 1), 0-based i
    x = torch.randn(2, 24, SMALL["n_embd"], generator=torch.Generator().manual_seed(3))
    head_dim = SMALL["n_embd"] // SMALL["n_head"]
    with torch.no_grad():
        for i, (plain_block, scaled_block) in enumerate(zip(plain.transformer.h, scaled.transformer.h)):
            expected = attention_by_hand(scaled_block.attn, x, 1 / math.sqrt(head_dim) / (i + 1))
            torch.testing.assert_close(scaled_block.attn(x), expected, rtol=1e-5, atol=1e-6)
            unscaled = attention_by_hand(plain_block.attn, x, 1 / math.sqrt(head_dim))
            torch.testing.assert_close(plain_block.attn(x), unscaled, rtol=1e-5, atol=1e-6)
            if i > 0:
                assert (expected - unscaled).abs().max() > 1e-3


@pytest.mark.parametrize("bias,vocab_size,scale_attn", [(True, 50257, False), (True, 50257, True),
                                                        (False, 50304, True)])
def test_to_hf_logits_match_ours(bias, vocab_size, scale_attn):
    ours = GPT(GPTConfig(block_size=64, vocab_size=vocab_size, bias=bias,
                         scale_attn_by_inverse_layer_idx=scale_attn, **SMALL))
    randomize_(ours, torch.Generator().manual_seed(3))
    ours.eval()
    hf = ours.to_hf(attn_implementation="eager").eval()
    assert isinstance(hf, GPT2LMHeadModel)
    assert hf.config.scale_attn_by_inverse_layer_idx == scale_attn
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # still tied
    idx = torch.randint(0, vocab_size, (2, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_logits_close(ours(idx)[0], hf(idx).logits)
    # and back: from_hf(to_hf(m)) holds exactly the same numbers
    back = GPT.from_hf(hf)
    back_sd = back.state_dict()
    for name, p in ours.state_dict().items():
        torch.testing.assert_close(back_sd[name], p, rtol=0, atol=0)


def test_loss_is_cross_entropy_of_logits_with_ignore_index():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=100, **SMALL))
    idx = torch.randint(0, 100, (3, 20))
    targets = torch.randint(0, 100, (3, 20))
    logits, loss = m(idx, targets)
    assert logits.shape == (3, 20, 100)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 100), targets.reshape(-1)))
    # gradients of the loss as autograd gets them through F.cross_entropy on the returned logits
    (ref_grad,) = torch.autograd.grad(F.cross_entropy(logits.reshape(-1, 100), targets.reshape(-1)),
                                      m.lm_head.weight, retain_graph=True)
    (grad,) = torch.autograd.grad(loss, m.lm_head.weight)
    torch.testing.assert_close(grad, ref_grad)

    # targets == -1 are left out of the mean: the same as the mean over the kept positions only
    masked = targets.clone()
    masked[0, :7] = -1
    masked[2, 15:] = -1
    logits, loss = m(idx, masked)
    keep = masked.reshape(-1) != -1
    expected = F.cross_entropy(logits.reshape(-1, 100)[keep], masked.reshape(-1)[keep])
    torch.testing.assert_close(loss, expected)


def test_hf_loss_matches_on_shifted_labels():
    # HF computes the LM loss itself (labels shifted inside); ours on pre-shifted targets must agree
    hf = hf_reference(True)
    ours = GPT.from_hf(hf).eval()
    tokens = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hf_loss = hf(tokens, labels=tokens).loss
        _, loss = ours(tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-5)


def test_sequence_longer_than_block_size_is_a_clear_error():
    m = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    m(torch.zeros(1, 16, dtype=torch.long))  # exactly block_size is fine
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_gpt2_init_statistics():
    torch.manual_seed(0)
    n_layer = 8
    m = GPT(GPTConfig(block_size=64, vocab_size=2048, n_layer=n_layer, n_head=4, n_embd=256, bias=True))
    assert m.lm_head.weight is m.transformer.wte.weight  # tied
    residual_std = 0.02 / math.sqrt(2 * n_layer)
    for name, p in m.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - residual_std) < 0.05 * residual_std, name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert abs(p.std().item() - 0.02) < 0.05 * 0.02, name
            assert abs(p.mean().item()) < 0.002, name
        elif name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            assert torch.all(p == 1), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            raise AssertionError(f"unexpected parameter {name}")


def test_param_and_flop_count_by_hand():
    V, T, L, H, C = 1000, 128, 2, 4, 64
    m = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=H, n_embd=C, bias=False))
    # per block: ln_1 (C), c_attn (3C·C), attn c_proj (C·C), ln_2 (C), c_fc (4C·C), mlp c_proj (4C·C)
    per_block = C + 3 * C * C + C * C + C + 4 * C * C + 4 * C * C
    non_embedding = V * C + L * per_block + C  # tied wte/head + blocks + ln_f; wpe left out
    assert m.num_params(non_embedding=True) == non_embedding
    assert m.num_params(non_embedding=False) == non_embedding + T * C
    # PaLM appendix B: 6N + 12·L·H·Q·T, Q = C / H
    assert m.flops_per_token() == 6 * non_embedding + 12 * L * H * (C // H) * T
    assert m.flops_per_token(seq_len=32) == 6 * non_embedding + 12 * L * H * (C // H) * 32


@pytest.mark.parametrize("bias", [False, True])
def test_optimizer_groups_decay_linear_weights_only(bias):
    """The official configure_optimizers: nn.Linear weights decay; embeddings (the tied head included),
    LayerNorm weights and biases do not. Checked by parameter name."""
    m = GPT(GPTConfig(block_size=32, vocab_size=100, bias=bias, **SMALL))
    decay, no_decay = m.configure_optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    name_of = {id(p): name for name, p in m.named_parameters()}  # the tied weight is named transformer.wte.weight
    decayed = sorted(name_of[id(p)] for p in decay["params"])
    not_decayed = sorted(name_of[id(p)] for p in no_decay["params"])
    linear_weights = ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
    assert decayed == sorted(f"transformer.h.{i}.{w}" for i in range(m.config.n_layer) for w in linear_weights)
    assert "transformer.wte.weight" in not_decayed and "transformer.wpe.weight" in not_decayed
    assert all(n.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")) for n in not_decayed
               if n not in ("transformer.wte.weight", "transformer.wpe.weight"))
    # every parameter exactly once, the tied head/embedding included
    assert len(decayed) + len(not_decayed) == len(set(decayed + not_decayed)) == len(list(m.parameters()))


def test_loss_double_backward_matches_f_cross_entropy():
    # Sophia-H takes Hessian-vector products through the loss (create_graph=True): ours must carry
    # softmax's curvature like F.cross_entropy does
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(0, 50, (2, 12))
    targets = torch.randint(0, 50, (2, 12))
    targets[1, :3] = -1
    params = [p for p in m.parameters()]
    probes = [torch.randn_like(p) for p in params]

    def hessian_vector_product(use_reference):
        # flash/efficient SDPA kernels have no double backward: Hutchinson's forward runs on the math one
        with sdpa_kernel(SDPBackend.MATH):
            logits, loss = m(idx, targets)
        if use_reference:
            loss = F.cross_entropy(logits.view(-1, 50), targets.view(-1), ignore_index=-1)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return grads, torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, probes)), params)

    grads, hvp = hessian_vector_product(use_reference=False)
    ref_grads, ref_hvp = hessian_vector_product(use_reference=True)
    for a, b in zip(grads + hvp, ref_grads + ref_hvp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert max(h.abs().max().item() for h in hvp) > 1e-3  # a real, non-zero curvature signal


def test_gradients_match_hf():
    # one training backward through both models: every parameter's gradient agrees (the tied
    # embedding collects the head's and the lookup's parts; HF's Conv1D weights are transposed)
    hf = hf_reference(True)
    hf.train()  # dropout is 0: train mode only changes nothing but the code path
    ours = GPT.from_hf(hf).train()
    tokens = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(6))
    hf(tokens, labels=tokens).loss.backward()
    ours(tokens[:, :-1], tokens[:, 1:])[1].backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = hf_params[name].grad
        if name.endswith(GPT._conv1d_suffixes):
            ref = ref.t()
        scale = ref.abs().max().item()
        torch.testing.assert_close(p.grad, ref, rtol=0, atol=2e-5 * scale + 1e-9, msg=name)
        assert p.grad.layout == torch.strided, name  # dense, as optimizers expect


def test_tied_embedding_grad_is_dense_whatever_reaches_it_first():
    """On CPU the lookup's gradient is sparse. .grad must end dense and right when the lookup is the only
    path (a backward from the embedding output) and when it is accumulated before or after a full loss."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=8))
    wte = m.transformer.wte.weight
    idx = torch.randint(0, 50, (2, 12))
    embedded = {}
    m.transformer.drop.register_forward_hook(lambda module, args, out: embedded.update(x=out))
    weights = torch.randn(2, 12, 8)
    lookup_only = torch.zeros(50, 8).index_add_(0, idx.flatten(), weights.view(-1, 8))  # d(Σ w·x)/d wte by hand

    def lookup_backward():
        m(idx)
        (embedded["x"] * weights).sum().backward()

    def loss_backward():
        m(idx, idx)[1].backward()

    lookup_backward()
    assert wte.grad.layout == torch.strided
    torch.testing.assert_close(wte.grad, lookup_only)

    wte.grad = None
    loss_backward()
    full_loss = wte.grad.clone()
    for first, second in ((lookup_backward, loss_backward), (loss_backward, lookup_backward)):
        wte.grad = None
        first()
        second()
        assert wte.grad.layout == torch.strided
        torch.testing.assert_close(wte.grad, full_loss + lookup_only)


def test_from_hf_local_directory(tmp_path):
    # the offline way to load a checkpoint: a save_pretrained directory
    hf = hf_reference(False)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_hf(str(tmp_path)).eval()
    idx = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_logits_close(ours(idx)[0], hf(idx).logits)


def test_the_cpu_token_lookup_gives_torchs_dense_gradient():
    """cpu_kernels' token lookup (a sparse gradient on CPU, made dense by its hook) equals F.embedding, output and
    gradient; model.py keeps the architecture and leaves such kernels to cpu_kernels.py."""
    import cpu_kernels
    import model
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=gen, requires_grad=True)
    weight.register_post_accumulate_grad_hook(cpu_kernels.densify_grad)
    reference = weight.detach().clone().requires_grad_()
    idx = torch.randint(0, 50, (3, 7), generator=gen)  # (B, T), repeated ids among them
    upstream = torch.randn(3, 7, 8, generator=gen)
    out = cpu_kernels.token_embedding(idx, weight)
    (out * upstream).sum().backward()
    expected = F.embedding(idx, reference)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(out, expected)
    assert not weight.grad.is_sparse
    torch.testing.assert_close(weight.grad, reference.grad)
    assert "autograd.Function" not in Path(model.__file__).read_text()
