"""
The configuration's schema: every knob of train.py, its type and a one-line description.

The values live in configs/ (train.yaml, the groups, the presets); each YAML file names its schema here
in its defaults list (`base_train`, `base_model`, `base_<optimizer>`, `base_data`), so Hydra checks every
value's type as it composes. To add a knob: a field here, its value in YAML.
"""

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class ModelConfig:
    name: str = MISSING                              # the model's name (W&B group and tag)
    n_layer: int = MISSING                           # transformer blocks
    n_head: int = MISSING                            # attention heads per block
    n_embd: int = MISSING                            # embedding width, a multiple of n_head
    block_size: int = MISSING                        # sequence length in tokens
    vocab_size: int = MISSING                        # vocabulary size (GPT-2's 50257 padded to 50304)
    dropout: float = MISSING                         # dropout probability (0 in the paper)
    bias: bool = MISSING                             # biases in the Linear and LayerNorm layers
    scale_attn_by_inverse_layer_idx: bool = MISSING  # also divide layer i's attention scores by i + 1 (official runs)


@dataclass
class OptimConfig:
    """What every optimizer has; each one below adds its own knobs."""
    name: str = MISSING            # the optimizer (choose it with optim=adamw | lion | sophiag | sophiah)
    lr: float = MISSING            # peak learning rate, reached after warmup_steps
    betas: list[float] = MISSING   # [beta1, beta2]: the two EMA decay rates, each in [0, 1)
    weight_decay: float = MISSING  # decoupled weight decay, on >=2-D weights only


@dataclass
class AdamWConfig(OptimConfig):
    eps: float = MISSING  # added to sqrt(v) in AdamW's denominator


@dataclass
class LionConfig(OptimConfig):
    pass


@dataclass
class SophiaGConfig(OptimConfig):
    rho: float = MISSING                   # clipping threshold of the preconditioned step (the paper: 0.03-0.08)
    hess_interval: int = MISSING           # k: refresh the Hessian EMA every k steps
    hess_batch_size: int | None = MISSING  # sequences in a Hessian batch; null -> total_batch_size (official)


@dataclass
class SophiaHConfig(SophiaGConfig):
    probe: str = MISSING  # Hutchinson's probe vectors: rademacher | gaussian


OPTIMIZERS = {"adamw": AdamWConfig, "lion": LionConfig, "sophiag": SophiaGConfig, "sophiah": SophiaHConfig}


@dataclass
class DataConfig:
    name: str = MISSING        # the corpus: data/<name>/prepare.py writes its train.bin and val.bin
    dir: str | None = MISSING  # where the bins are; null -> <repo>/data/<name>; relative to the repo root


@dataclass
class WandbConfig:
    enabled: bool = MISSING       # log to Weights & Biases too (metrics.jsonl is always written)
    project: str = MISSING        # W&B project
    entity: str | None = MISSING  # W&B entity (user or team); null -> your default one
    group: str | None = MISSING   # W&B group; null -> the model name, so one size's optimizers sit together
    tags: list[str] = MISSING     # extra W&B tags (the optimizer, model and data names are always added)
    mode: str | None = MISSING    # online | offline | disabled; null -> wandb's own default (WANDB_MODE)


@dataclass
class TrainConfig:
    out_dir: str | None = MISSING           # run directory; null -> out/<run_name>; may use ${run_name}
    run_name: str | None = MISSING          # null -> the preset name plus the command-line overrides
    resume: bool = MISSING                  # continue from out_dir/ckpt.pt when it exists (a requeued SLURM job needs this)
    seed: int = MISSING                     # seed of the initial weights, the data order, dropout and the Hessian samples
    device: str = MISSING                   # auto (cuda:LOCAL_RANK when CUDA is there, else cpu) | cpu | cuda | cuda:N
    dtype: str = MISSING                    # auto (bfloat16 autocast on CUDA, float32 on CPU) | float32 | bfloat16
    compile: bool = MISSING                 # torch.compile the model (before DDP)
    max_steps: int = MISSING                # optimizer steps
    warmup_steps: int = MISSING             # linear warmup from 0 to optim.lr over this many steps
    lr_decay_steps: int | None = MISSING    # cosine decay from optim.lr to min_lr over this many steps; null -> max_steps
    min_lr: float = MISSING                 # learning rate at the end of the cosine decay
    grad_clip: float = MISSING              # clip the global gradient norm at this value; 0 disables
    total_batch_size: int = MISSING         # sequences per optimizer step, over all ranks and micro-steps (the paper: 480)
    micro_batch_size: int = MISSING         # sequences per forward/backward on one rank; accumulation is derived
    eval_interval: int = MISSING            # evaluate every this many steps (and at the end)
    eval_steps: int = MISSING               # validation micro-batches per evaluation, spread over the ranks
    log_interval: int = MISSING             # steps between metrics lines
    ckpt_interval: int = MISSING            # steps between checkpoints (and at the end, and on preemption)
    cpu_peak_flops: float | None = MISSING  # MFU peak on CPU in FLOP/s; null -> measured once by timing fp32 matmuls
    model: ModelConfig = MISSING
    optim: OptimConfig = MISSING
    data: DataConfig = MISSING
    wandb: WandbConfig = field(default_factory=WandbConfig)


def register():
    cs = ConfigStore.instance()
    cs.store(name="base_train", node=TrainConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    for name, schema in OPTIMIZERS.items():
        # typed but not struct: a Sophia preset sets optim.rho, and `python train.py optim=adamw` puts AdamW
        # under that preset
        node = OmegaConf.structured(schema)
        OmegaConf.set_struct(node, False)
        cs.store(group="optim", name=f"base_{name}", node=node)


register()
