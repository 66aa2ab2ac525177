"""
optim=muon: Muon for the transformer blocks' weight matrices (attention and MLP), torch.optim.AdamW for the rest
(token and position embeddings, LayerNorms, biases), the split of modded-nanogpt and llm-baselines.

Muon's step is torch.optim.Muon's, written out here (tests/test_muon.py holds it equal to torch's, bit for bit) so
that its Newton-Schulz iteration can also run in float32: torch's runs in bfloat16, which a CPU without bf16
instructions (AVX2 only) emulates, many times slower than float32 (scripts/bench_optim.py --model baby compares
them). ns_dtype=auto picks the fast one for the device.

MuonAdamW is the two as one torch.optim.Optimizer: its param_groups are Muon's group then AdamW's group (the very
dict the inner AdamW steps), so the loop's one schedule sets both learning rates, and its state_dict is the
standard one (both parts' state by parameter index; Muon's is torch's "momentum_buffer"), which checkpoints save
and resume like any other.
"""

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of Keller Jordan's Muon and torch's: the steepest slope at 0


def param_groups(model, weight_decay):
    """(Muon's group, AdamW's group): model.py's official grouping, unchanged. Its decayed group is exactly the
    nn.Linear weights inside the blocks (the head's weight is the token embedding, which does not decay): the
    matrices Muon is for. The other group (embeddings, LayerNorms, biases) goes to AdamW, without decay."""
    decayed, rest = model.configure_optimizer_groups(weight_decay)
    matrices = {id(m.weight) for m in model.transformer.h.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(p) for p in decayed["params"]} == matrices, "Muon's part must be the blocks' nn.Linear weights"
    return decayed, rest


def cpu_has_bf16():
    """Whether this CPU has bf16 matmul instructions (x86 AVX-512 BF16 or AMX), as torch detects them."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def newton_schulz_dtype(name, device):
    """optim.ns_dtype as a torch dtype. auto: bfloat16 (torch's) where matmuls have bf16 instructions (CUDA, and
    x86 CPUs with AVX-512 BF16 or AMX), float32 elsewhere, where bf16 is emulated (many times slower than float32
    on an AVX2-only CPU: scripts/bench_optim.py --model baby compares them)."""
    if name != "auto":
        return getattr(torch, name)
    device = torch.device(device)
    bf16_instructions = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
    return torch.bfloat16 if bf16_instructions else torch.float32


def orthogonalize(update, ns_steps, dtype, eps=1e-7):
    """Newton-Schulz on update (rows, cols) = U S V^T -> about U V^T, in dtype: U S' V^T with S' between about 0.7
    and 1.2 (the quintic trades exact convergence for speed)."""
    a, b, c = NS_COEFFICIENTS
    tall = update.size(0) > update.size(1)
    x = update.to(dtype).T if tall else update.to(dtype)  # (short, long): the Gram matrix is the smaller one
    x = x / x.norm().clamp(min=eps)  # Frobenius >= spectral norm: every singular value now at most 1
    for _ in range(ns_steps):
        gram = x @ x.T  # (short, short)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # (a + b G + c G^2) x
    return x.T if tall else x


def lr_ratio(adjust_lr_fn, shape):
    """Muon's lr per matrix (rows, cols): match_rms_adamw gives its update AdamW's RMS (0.2 sqrt(max)), so it can
    share AdamW's lr (Moonlight); original scales by sqrt(rows / cols) when that exceeds 1 (Keller Jordan)."""
    rows, cols = shape[:2]
    return 0.2 * math.sqrt(max(rows, cols)) if adjust_lr_fn == "match_rms_adamw" else math.sqrt(max(1, rows / cols))


class MuonAdamW(torch.optim.Optimizer):
    """Muon on muon_group's matrices at lr, AdamW (fused) on adamw_group at adam_lr. Each group keeps its own
    weight_decay. The loop sets group["lr"] = schedule(step) * group["lr_scale"], the schedule peaking at lr, so
    lr_scale is 1 for Muon and adam_lr / lr for AdamW: one warmup and cosine scale both parts. ns_dtype is the
    Newton-Schulz iteration's dtype (a run's setting, not saved with the state: a resume may change it)."""

    def __init__(self, muon_group, adamw_group, *, lr, adam_lr, momentum, nesterov, ns_steps, ns_dtype,
                 adjust_lr_fn, betas, eps):
        muon = {**muon_group, "lr": lr, "lr_scale": 1.0, "momentum": momentum, "nesterov": nesterov,
                "ns_steps": ns_steps, "adjust_lr_fn": adjust_lr_fn}
        self.adamw = torch.optim.AdamW([{**adamw_group, "lr_scale": adam_lr / lr}], lr=adam_lr, betas=betas,
                                       eps=eps, fused=True)
        super().__init__([muon, *self.adamw.param_groups], defaults={})  # the same AdamW group dict
        self.ns_dtype = ns_dtype
        self._share_groups_and_state()

    def _share_groups_and_state(self):
        """The inner AdamW steps our group dict and fills our state (one dict, keyed by parameter)."""
        self.adamw.param_groups = self.param_groups[1:]
        self.adamw.state = self.state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # replaces self.param_groups and self.state with new objects
        self._share_groups_and_state()

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buffer = state["momentum_buffer"]  # EMA of the gradient
            buffer.lerp_(p.grad, 1 - group["momentum"])
            update = p.grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
            update = orthogonalize(update, group["ns_steps"], self.ns_dtype)
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-(group["lr"] * lr_ratio(group["adjust_lr_fn"], p.shape)))
        self.adamw.step()
