"""
GPT-2 as in the paper (Radford et al. 2019), the model every optimizer in this repo trains.

Pre-LayerNorm transformer blocks, fused QKV projection, causal attention through
F.scaled_dot_product_attention (flash kernels on GPU), tanh-approximated GELU (GPT-2's `gelu_new`),
tied input/output embeddings, GPT-2 initialisation. Module names follow HF's GPT2LMHeadModel so that
GPT.from_hf / model.to_hf are a transpose of the Conv1D weights and nothing else.

Also here: the FLOP count per token (PaLM appendix B); the device's peak and MFU are in mfu.py. The loss and
the token lookup go through cpu_kernels.py, which takes faster paths for fp32 on the CPU and torch's own
functions everywhere else.

Double backward (Hessian-vector products for Sophia-H): the flash / memory-efficient SDPA kernels have
no derivative of their backward, so run that forward under
`torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`; the loss itself supports it (tests/test_model.py).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpu_kernels import cross_entropy, densify_grad, token_embedding


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm; GPT-2's own checkpoints have them
    # GPT-2 medium/large in the paper: attention scores of layer i (0-based) also divided by (i + 1)
    scale_attn_by_inverse_layer_idx: bool = False

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}; "
                             f"pick n_embd as a multiple of n_head")


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        head_dim = config.n_embd // config.n_head
        # softmax(q·k / sqrt(head_dim) / (layer_idx + 1)) with the paper's trick, as HF's GPT2Attention
        self.scale = 1.0 / math.sqrt(head_dim)
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer_idx + 1)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2's gelu_new
        return self.dropout(self.c_proj(x))


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embedding, as GPT-2
        # the lookup's gradient may arrive sparse (token_embedding): optimizers and DDP need .grad dense
        self.transformer.wte.weight.register_post_accumulate_grad_hook(densify_grad)

        # GPT-2 init: N(0, 0.02) for weights, zero biases; the projections that write into the residual
        # stream get std 0.02 / sqrt(2 * n_layer) so the residual's variance does not grow with depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameter count. non_embedding=True leaves out the position embedding only: the token
        embedding is also the output head, whose matmul is real compute (nanoGPT's convention)."""
        n = sum(p.numel() for p in self.parameters())  # tied weight counted once
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} > block_size {self.config.block_size}: "
                             f"shorten the input or build the model with block_size >= {T}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = token_embedding(idx, self.transformer.wte.weight)  # (B, T, C)
        x = tok_emb + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab): every position, the GNB estimator samples from all
        loss = None
        if targets is not None:
            loss = cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    # ---------------------------------------------------------------- HF GPT2LMHeadModel conversion

    # HF's Conv1D stores weights as (in, out), nn.Linear as (out, in)
    _conv1d_suffixes = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_hf(cls, hf_model_or_path):
        """Our GPT with the weights of a transformers GPT2LMHeadModel (in memory, or a local directory /
        hub name for from_pretrained). GPT-2's own layout: biases on, vocab as in the HF config
        (50257 for OpenAI's checkpoints), the scale_attn_by_inverse_layer_idx flag carried over,
        dropout 0 (the paper's setting)."""
        from transformers import GPT2LMHeadModel
        hf = hf_model_or_path
        if not isinstance(hf, GPT2LMHeadModel):
            hf = GPT2LMHeadModel.from_pretrained(hf_model_or_path)
        hc = hf.config
        if hc.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"HF activation {hc.activation_function!r} is not GPT-2's tanh GELU; "
                             f"only gelu_new / gelu_pytorch_tanh convert exactly")
        if not hc.scale_attn_weights or hc.n_inner not in (None, 4 * hc.n_embd):
            raise ValueError("only the standard GPT-2 layout converts: scale_attn_weights=True, "
                             "n_inner=None (4 * n_embd)")
        if abs(hc.layer_norm_epsilon - 1e-5) > 1e-12:
            raise ValueError(f"layer_norm_epsilon={hc.layer_norm_epsilon}: our LayerNorm uses 1e-5")
        if not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight):
            raise ValueError("HF model's lm_head is not tied to its token embedding; GPT-2 ties them and "
                             "so does this model: convert only tied checkpoints")
        config = GPTConfig(block_size=hc.n_positions, vocab_size=hc.vocab_size, n_layer=hc.n_layer,
                           n_head=hc.n_head, n_embd=hc.n_embd, dropout=0.0, bias=True,
                           scale_attn_by_inverse_layer_idx=hc.scale_attn_by_inverse_layer_idx)
        model = cls(config)
        hf_sd = hf.state_dict()
        sd = model.state_dict()
        with torch.no_grad():
            for name, p in sd.items():
                if name == "lm_head.weight":
                    continue  # tied to transformer.wte.weight
                src = hf_sd[name]
                if name.endswith(cls._conv1d_suffixes):
                    src = src.t()
                p.copy_(src)
        return model

    def to_hf(self, attn_implementation=None):
        """A transformers GPT2LMHeadModel with the same weights (biases are zeros when bias=False).
        attn_implementation: HF's choice ("eager", "sdpa", ...); None keeps HF's default."""
        from transformers import GPT2Config, GPT2LMHeadModel
        c = self.config
        hc = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                        n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                        layer_norm_epsilon=1e-5, scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
                        tie_word_embeddings=True, attn_implementation=attn_implementation)
        hf = GPT2LMHeadModel(hc)
        sd = self.state_dict()
        with torch.no_grad():
            for name, p in hf.state_dict().items():
                if name == "lm_head.weight":
                    continue  # tied to transformer.wte.weight
                if name not in sd:  # a bias our bias=False model does not have
                    p.zero_()
                    continue
                src = sd[name]
                if name.endswith(self._conv1d_suffixes):
                    src = src.t()
                p.copy_(src)
        return hf.to(self.transformer.wte.weight.device)

    # ---------------------------------------------------------------- sampling

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, vocab_size=None):
        """idx (B, T) token ids -> (B, T + max_new_tokens), one sampled token at a time (temperature 0: greedy).
        The context is cropped to the last block_size tokens (the position embedding covers no more).
        vocab_size: only the first vocab_size logits compete, so that the padding rows of a padded
        embedding (50257..50303 for GPT-2's tokenizer) are never sampled."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]  # (B, <= block_size)
            logits, _ = self(context)  # (B, T, V)
            logits = logits[:, -1, :vocab_size]  # (B, V): only the next token's
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                    logits = logits.masked_fill(logits < kth_best, float("-inf"))
                probs = F.softmax(logits, dim=-1)  # (B, V)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx

    # ---------------------------------------------------------------- FLOPs, optimizer groups

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token, PaLM appendix B: 6N + 12·L·H·Q·T.
        N: parameters whose matmuls run per token = all but the position embedding (the tied token
        embedding is the output head's matmul), as nanoGPT's estimate; L layers, H heads, Q head dim,
        T the attended sequence length (block_size unless given: pass the length actually trained on)."""
        c = self.config
        T = c.block_size if seq_len is None else seq_len
        N = self.num_params(non_embedding=True)
        return 6 * N + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * T

    def parts(self):
        """The parameters by part, for statistics per part: the token embedding (also the head; most of a small
        model's coordinates) and the transformer blocks."""
        return {"embedding": [self.transformer.wte.weight], "blocks": list(self.transformer.h.parameters())}

    def configure_optimizer_groups(self, weight_decay):
        """Two param groups, as the official Sophia repository's configure_optimizers (both its scripts):
        only nn.Linear weights decay. The token embedding (tied with the head), the position embedding,
        LayerNorm weights and all biases do not. Used by every optimizer."""
        tied_head = self.lm_head.weight  # a Linear's weight, but it is the token embedding: no decay
        decayed = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear) and m.weight is not tied_head}
        params = [p for p in self.parameters() if p.requires_grad]  # the tied weight appears once
        return [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
                {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
