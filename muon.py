"""
optim=muon: torch.optim.Muon for the transformer blocks' weight matrices (attention and MLP), torch.optim.AdamW
for the rest (token and position embeddings, LayerNorms, biases), the split of modded-nanogpt and llm-baselines.

MuonAdamW is the two as one torch.optim.Optimizer: its param_groups are Muon's group then AdamW's group (the very
dicts the two inner optimizers step), so the loop's one schedule sets both learning rates, and its state_dict is
the standard one (both parts' state by parameter index), which checkpoints save and resume like any other.
"""

import torch


def param_groups(model, weight_decay):
    """(Muon's group, AdamW's group): model.py's official grouping, unchanged. Its decayed group is exactly the
    nn.Linear weights inside the blocks (the head's weight is the token embedding, which does not decay): the
    matrices Muon is for. The other group (embeddings, LayerNorms, biases) goes to AdamW, without decay."""
    decayed, rest = model.configure_optimizer_groups(weight_decay)
    matrices = {id(m.weight) for m in model.transformer.h.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(p) for p in decayed["params"]} == matrices, "Muon's part must be the blocks' nn.Linear weights"
    return decayed, rest


class MuonAdamW(torch.optim.Optimizer):
    """Muon on muon_group's matrices at lr, AdamW (fused) on adamw_group at adam_lr. Each group keeps its own
    weight_decay. The loop sets group["lr"] = schedule(step) * group["lr_scale"], the schedule peaking at lr, so
    lr_scale is 1 for Muon and adam_lr / lr for AdamW: one warmup and cosine scale both parts."""

    def __init__(self, muon_group, adamw_group, *, lr, adam_lr, momentum, nesterov, ns_steps, adjust_lr_fn,
                 betas, eps):
        self.muon = torch.optim.Muon([{**muon_group, "lr_scale": 1.0}], lr=lr, momentum=momentum,
                                     nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        self.adamw = torch.optim.AdamW([{**adamw_group, "lr_scale": adam_lr / lr}], lr=adam_lr, betas=betas,
                                       eps=eps, fused=True)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, defaults={})  # the same group dicts
        self._share_groups_and_state()

    def _share_groups_and_state(self):
        """The inner optimizers step our group dicts and fill our state (one dict, keyed by parameter)."""
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:1], self.param_groups[1:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # replaces self.param_groups and self.state with new objects
        self._share_groups_and_state()

    @torch.no_grad()
    def step(self):
        self.muon.step()
        self.adamw.step()
