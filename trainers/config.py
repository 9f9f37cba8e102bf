"""Every training option of one run, with the defaults of the MoCo v3 recipe scaled to a CPU-sized ViT.

A study file's ``train:`` section and its search space both name fields of :class:`TrainConfig`; its
``stopping:`` section is the typed :class:`~trainers.policy.StopPolicy` here, and ``augment`` is checked
against the method's view recipes (data/recipes.py) when the config is made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from data.recipes import ViewRecipe, views_for
from trainers.policy import StopPolicy

PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# The paper's ResNet-50 recipe (MoCo v3 Sec. 4 and appendix; recipe.md "Optimisation", "Augmentations", "Loss"):
# what a ResNet trial gets for the fields that neither its study file nor its search space sets. The dataclass
# defaults below are the ViT recipe. Temperature 1.0 is MoCo v3's (BYOL has none; SimCLR keeps its own 0.2).
RESNET_RECIPE = {"optimizer": "lars", "base_lr": 0.6, "weight_decay": 1e-6, "warmup_epochs": 10.0, "crop_min": 0.2}
RESNET_TEMPERATURE = {"moco_v3": 1.0}


def recipe_defaults(backbone: str, method: str) -> dict:
    """The defaults of ``backbone``'s recipe that differ from TrainConfig's (the ViT recipe): {} for a ViT."""
    from trainers.registry import RESNETS

    if backbone not in RESNETS:
        return {}
    return {**RESNET_RECIPE, **({"temperature": RESNET_TEMPERATURE[method]} if method in RESNET_TEMPERATURE else {})}


@dataclass
class TrainConfig:
    # what is trained
    method: str = "moco_v3"
    backbone: str = "vit_nano_patch4_32"
    stop_grad_conv1: bool = False  # frozen random patch projection (paper sec. 4.2); off in the official code
    pos_embed: str = "sincos"  # sincos | learned | none
    mlp_norm: str = "ln"  # ln | bn (ViT-BN)
    conv_stem: bool = False
    # data: FFCV files written by data.convert; subsets keep CPU studies short (None: the whole split)
    train_path: str = ""
    test_path: str = ""
    train_subset: int | None = None
    # The per-epoch kNN's bank: a fixed random sample of the training split (None: all of it). 65,536 images
    # are a whole Fashion-MNIST or CIFAR split and 5% of ImageNet's, whose whole bank would cost about a
    # training epoch's GPU time every epoch (its 1.28 M forwards and a 50 k x 1.28 M similarity).
    knn_bank_subset: int | None = 65536
    knn_eval_subset: int | None = None
    crop_min: float = 0.08
    augment: dict = field(default_factory=dict)  # data.recipes.ViewRecipe fields overriding the method's recipe
    loader_workers: int = 1
    # optimisation: lr = base_lr * batch_size / 256, linear warmup then half-cosine (per iteration)
    epochs: int = 3
    batch_size: int = 128  # global, split evenly across workers
    optimizer: str = "adamw"  # adamw | lars | lamb
    lamb_max_grad_norm: float | None = 1.0  # timm's LAMB clips the global gradient norm at this; None: never
    base_lr: float = 1.5e-4
    weight_decay: float = 0.1
    exclude_1d: bool | None = None  # no decay for biases and norms; None: the optimiser's recipe
    warmup_epochs: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 (with a grad scaler) | fp32
    compile: bool = False  # torch.compile the model
    # MoCo v3
    moco_m: float = 0.99  # m0 of the cosine momentum schedule towards 1
    temperature: float = 0.2
    dim: int = 256
    mlp_dim: int = 4096
    # evaluation: weighted kNN on the eval split after every epoch, and the paper's dense kNN monitor: every
    # monitor_every steps, the batch's class tokens against a FIFO bank of recent training features
    knn_k: int = 20
    knn_t: float = 0.07
    monitor_every: int = 10  # 0: off
    monitor_bank: int = 4096  # the paper: 10% of the training set
    online_probe: bool = False  # a Linear head trained on detached features during pretraining
    signals_every: int = 1  # instability signals (per-layer gradient norms, spikes, collapse) every N steps; 0: off
    stopping: StopPolicy = field(default_factory=StopPolicy)  # the study file's stopping: section
    trace: bool = False  # per-step signals (gradient norms per layer group, dense kNN) in checkpoints' trace.parquet
    # run
    seed: int = 0
    threads: int = 1  # torch intra-op threads per worker
    # Epochs between checkpoints (0: only at the end); the last one only is kept. Every epoch by default: a
    # lost worker or trial driver then redoes at most one epoch (a checkpoint of ViT-S: about 0.3 GB, 1 s).
    checkpoint_every: int = 1
    # Minutes between checkpoints inside an epoch (0: off): an ImageNet epoch on a few GPUs takes 10-60 minutes,
    # and a lost worker then redoes at most this many minutes instead of the epoch (the loader resumes mid-epoch).
    checkpoint_minutes: float = 0.0
    resume_from: str = ""  # a checkpoint directory to continue from when the run has none of its own
    export: bool = True  # the final checkpoint carries backbone.safetensors, loadable by timm

    def __post_init__(self) -> None:
        if isinstance(self.stopping, dict):  # from as_dict(), e.g. through Ray's config
            self.stopping = StopPolicy(**self.stopping)
        self.views  # noqa: B018  (unknown augment fields and bad values raise here, naming them)
        if not self.checkpoint_minutes >= 0:
            raise ValueError(f"train.checkpoint_minutes: must be >= 0 (0: off), got {self.checkpoint_minutes!r}")

    @property
    def views(self) -> tuple[ViewRecipe, ...]:
        """The views of this run: the method's recipe with ``crop_min`` and ``augment`` applied."""
        return views_for(self.method, self.crop_min, self.augment or None)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def as_dict(self) -> dict:
        """Plain values only (the stopping policy as a dict): what Ray passes to a worker."""
        return dataclasses.asdict(self)
