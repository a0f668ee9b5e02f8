"""`MedicConfig`: the training arguments of a MEDIC cloning run."""

from __future__ import annotations

from dataclasses import dataclass, field

from .training import ClassifierConfig

IMPORTANCE_MODES = ("both", "activation", "impact", "none")
HOOK_LAYER_KINDS = ("conv", "norm", "linear")
STATS_GRANULARITIES = ("channel", "neuron")
CLONE_POSITIONS = ("each", "mean")
IMPACT_SCALES = ("sigma", "rms")
CLONE_LOSS_SCHEDULES = ("constant", "cosine")
UNLABELED_LOSSES = ("clone", "logits", "both")
MIX_INPUTS = ("none", "mixup", "cutmix")
# The frozen_fraction of a student started from a trusted base, chosen on the transfer benchmark (docs/transfer.md).
BASE_FROZEN_FRACTION = 0.25


@dataclass
class MedicConfig(ClassifierConfig):
    r"""
    Configuration of [`MedicCloner`]: every [`ClassifierConfig`] field (the `transformers.TrainingArguments` and the
    data and optimiser options every method of medic_hf shares, `medic_hf/training.py`) plus the MEDIC fields below.

    MEDIC (Xu et al., "MEDIC: Remove Model Backdoors via Importance Driven Cloning", CVPR 2023) trains a freshly
    initialised copy of the architecture on a small clean data set with cross-entropy plus an importance-weighted
    loss that matches the (possibly trojaned) teacher's normalised activations where they matter for clean inputs.

    MEDIC defaults are the paper's (λ = 10, τ = 5, both criteria, all conv / norm / linear outputs) except two:
    `clone_logits=False` leaves the classifier's output out, as the authors' published command does, and
    `num_train_epochs=30` instead of the paper's 60, because the backdoor came back in longer runs. The
    measurements behind both are in docs/removal.md and docs/benchmarks.md ("MEDIC's budget").

    Defaults that differ from `TrainingArguments`, taken from the paper (Appendix D) unless stated:

    - `learning_rate=1e-2` (instead of 5e-5)
    - `weight_decay=1e-4` (instead of 0.0), applied as *coupled* L2 by Adam (`torch.optim.Adam`), not AdamW
    - `optim="adam"`-like behaviour: `coupled_weight_decay=True` (ClassifierConfig) builds `torch.optim.Adam`
    - `lr_scheduler_type="cosine"` (instead of `"linear"`)
    - `num_train_epochs=30` (instead of 3; the paper's 60 let the backdoor back: see above)
    - `per_device_train_batch_size=64` (instead of 8), `per_device_eval_batch_size=256` (instead of 8)
    - `remove_unused_columns=False` (instead of True): image columns are transformed on the fly
    - `label_names=["labels"]` (instead of inferred from the forward signature, which timm models lack)
    - `report_to="none"` (instead of every installed tracker)
    - `logging_steps=10` (instead of 500), `save_strategy="epoch"` (ClassifierConfig: "no"), `save_total_limit=2`
    - `output_dir="medic-output"`
    """

    # --- MEDIC ---
    clone_loss_weight: float = field(
        default=10.0,
        metadata={"help": "λ, the weight of the clone loss added to the cross-entropy (paper: 10)."},
    )
    temperature: float = field(
        default=5.0,
        metadata={
            "help": "τ in softmax(τ·x) for both importance criteria: larger is sharper; 0 gives uniform weights, "
            "i.e. plain cloning (paper Fig. 4). Default 5, the authors' published command."
        },
    )
    impact_temperature: float | None = field(
        default=None,
        metadata={"help": "τ for the impact criterion only; None uses `temperature` for both."},
    )
    importance: str = field(
        default="both",
        metadata={
            "help": "Which importance criteria weight the clone loss: 'both' (sqrt of the product, Eq. 4), "
            "'activation' (Eq. 2), 'impact' (Eq. 3) or 'none' (uniform weights; paper App. E.6).",
            "choices": list(IMPORTANCE_MODES),
        },
    )
    impact_scale: str = field(
        default="sigma",
        metadata={
            "help": "How the impact values are scaled before the softmax: 'sigma' (paper: |σ·∂ℓ/∂f|) or 'rms' "
            "(additionally divided by their RMS per sample and layer, which makes them as sharp as the activation "
            "term; see docs/method.md for why that is not the default).",
            "choices": list(IMPACT_SCALES),
        },
    )
    importance_cutoff: float = field(
        default=0.0,
        metadata={
            "help": "Weights below importance_cutoff / N (N: the layer's neuron count) are set to 0, so a neuron "
            "less important than that on a sample is not cloned at all for it. 0 keeps the paper's soft weights; "
            "1 clones only neurons more important than average."
        },
    )
    importance_top_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Hard selection instead of soft weights: per sample and layer, the top fraction of neurons by "
            "importance weight are cloned with equal weights (summing to 1) and the others not at all. None keeps "
            "the paper's soft weights."
        },
    )
    final_temperature: float | None = field(
        default=10.0,
        metadata={
            "help": "τ at the last training step, reached linearly from `temperature` (both criteria): a sharper "
            "selection late in training, when the student nears the teacher. None, or the value of `temperature`, "
            "keeps τ constant (the paper). The default 10 was chosen on the grid of docs/robust_default.md."
        },
    )
    clone_loss_schedule: str = field(
        default="constant",
        metadata={
            "help": "How λ changes over training: 'constant' (the paper) or 'cosine' (from clone_loss_weight down "
            "to 0 at the last step, so the low-learning-rate tail learns mostly from the labels).",
            "choices": list(CLONE_LOSS_SCHEDULES),
        },
    )
    mix_inputs: str = field(
        default="none",
        metadata={
            "help": "Mix pairs of clean images within each batch before both models see them: 'mixup' (Zhang et al. "
            "2018) or 'cutmix' (Yun et al. 2019), with the labels mixed in the same proportion; the teacher's "
            "activations on the mixed images are the targets. 'none': the paper.",
            "choices": list(MIX_INPUTS),
        },
    )
    mix_alpha: float = field(
        default=1.0,
        metadata={"help": "The Beta(α, α) parameter of the mixing proportion when mix_inputs is not 'none'."},
    )
    logit_distillation: float = field(
        default=0.0,
        metadata={
            "help": "Weight α of Hinton et al.'s distillation of the teacher's softened class probabilities: the "
            "label loss becomes (1 − α)·CE + α·T²·KL(teacher ‖ student) at temperature distillation_temperature. "
            "0: the paper's cross-entropy on the labels alone."
        },
    )
    distillation_temperature: float = field(
        default=4.0,
        metadata={"help": "The temperature T of logit_distillation."},
    )
    student_input_noise: float = field(
        default=0.0,
        metadata={
            "help": "Standard deviation of Gaussian noise added to the student's input only (in units of the "
            "normalised input), so the student learns the teacher's clean activations from perturbed images and "
            "becomes insensitive to small input patterns. 0: off (the paper)."
        },
    )
    student_input_blend: float = field(
        default=0.0,
        metadata={
            "help": "Largest weight a of another clean image of the batch laid over each of the student's inputs, "
            "x' = (1 − a)·x + a·x_other with a drawn uniformly in [0, student_input_blend) per image; the teacher's "
            "targets and the label stay those of x, so the student learns to ignore faint whole-image overlays "
            "(the shape of Blended and SIG triggers). 0: off (the paper)."
        },
    )
    unlabeled_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Images drawn at random from the unlabeled data set (MedicCloner(unlabeled_dataset=...), "
            "--unlabeled_dataset_name) and added to every clean batch: they enter the clone loss only (or the "
            "teacher's logits, unlabeled_loss), their importance weights taken at the teacher's own predicted class; "
            "the cross-entropy stays on the labelled clean images. None: per_device_train_batch_size. Without an "
            "unlabeled data set it does nothing."
        },
    )
    unlabeled_loss: str = field(
        default="clone",
        metadata={
            "help": "What the unlabeled images teach the student. 'clone': the clone loss (Eq. 1, importance at the "
            "teacher's own class). 'logits': only the teacher's softened class probabilities, T²·KL(teacher ‖ "
            "student) at distillation_temperature, added to the loss (Pang et al.'s distillation on unlabeled data); "
            "they are left out of the clone loss. 'both': the two. Without an unlabeled data set it does nothing.",
            "choices": list(UNLABELED_LOSSES),
        },
    )
    ema_decay: float = field(
        default=0.998,
        metadata={
            "help": "Keep an exponential moving average of the student's weights with this decay (Polyak "
            "averaging, as timm's ModelEmaV3, with its warmup) and evaluate and save the average instead of the "
            "last weights. 0: off (the paper). The default was chosen with final_temperature (docs/robust_default.md)."
        },
    )
    hook_layers: list[str] = field(
        default_factory=lambda: list(HOOK_LAYER_KINDS),
        metadata={
            "help": "Kinds of modules whose outputs are cloned: any of 'conv', 'norm', 'linear' "
            "(paper App. D: all convolution, normalization and fully-connected layers)."
        },
    )
    clone_logits: bool = field(
        default=False,
        metadata={
            "help": "Also clone the output of the module that produces the logits (the classifier), as the paper's "
            "text says. Off by default, as in the authors' published command (conv + norm outputs only): cloning the "
            "logits copied more of the backdoor in every measurement (docs/removal.md)."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Only clone modules whose qualified name ends with one of these suffixes, or matches this "
            "regex when a single string is given (PEFT style). None keeps every module of `hook_layers`."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Never clone modules whose name ends with one of these suffixes, or matches this regex."},
    )
    clone_attention: bool | None = field(
        default=None,
        metadata={
            "help": "Clone the outputs of the modules inside attention layers (query / key / value and output "
            "projections; `medic_hf.neurons.attention_modules`). They still train. None: no when the student starts "
            "from a trusted base given by name or folder (`student=`, --student_name_or_path), since on a ViT cloning "
            "them carried most of a BadNets backdoor into the student (docs/transfer.md); yes otherwise (the paper). "
            "A model without attention layers is unaffected."
        },
    )
    frozen_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of the student's conv / norm / linear modules, from the input, kept at their starting "
            "values (with every parameter before them) and left out of the clone loss. None: "
            "BASE_FROZEN_FRACTION when the student starts from a trusted base given by name or folder (`student=`, "
            "--student_name_or_path), whose early features never saw the trigger; 0 otherwise (the paper). "
            "See docs/transfer.md for how it was chosen."
        },
    )
    base_warmup: float = field(
        default=0.1,
        metadata={
            "help": "Learning-rate warmup of a student started from a trusted base when `warmup_steps` is 0: a "
            "fraction of all steps in [0, 1), or a number of steps (as `warmup_steps`). Without it the student "
            "copies part of the backdoor in its first epochs (docs/transfer.md). 0 turns it off; a student built "
            "without a base never warms up unless `warmup_steps` says so (the paper)."
        },
    )
    early_lr_scale: float = field(
        default=0.0,
        metadata={
            "help": "Learning-rate multiplier of the early modules that `frozen_fraction` selects: 0 keeps them at "
            "the base's values and out of the clone loss (the default); a value in (0, 1] trains and clones them at "
            "that fraction of the learning rate instead (discriminative fine-tuning, Howard & Ruder 2018)."
        },
    )
    freeze_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Keep the student's modules whose name ends with one of these suffixes, or matches this regex, "
            "at their starting values: their parameters are not trained (normalisation statistics still adapt). "
            "Meant for a student started from a trusted base (`student=`), whose early stages then stay trusted. "
            "None trains every parameter (the paper)."
        },
    )
    stats_granularity: str = field(
        default="channel",
        metadata={
            "help": "'channel': one μ and σ per channel of a layer, shared by all its spatial positions / tokens; "
            "'neuron': one per output element (the paper's wording).",
            "choices": list(STATS_GRANULARITIES),
        },
    )
    clone_positions: str | None = field(
        default=None,
        metadata={
            "help": "'each': Eq. 1 at every position (pixel, token) of a layer (the paper); 'mean': Eq. 1 on each "
            "channel's mean over its positions, the channel weighted by its importance weights summed over them, "
            "so the student matches what a channel says about the image, not where; prefix tokens (a ViT's class "
            "token) keep Eq. 1. None: 'mean' when the student starts from a trusted base given by name or folder "
            "(`student=`, --student_name_or_path) and stats_granularity is 'channel', 'each' otherwise (the paper). "
            "'mean' needs stats_granularity='channel'. See docs/transfer.md for how it was chosen.",
            "choices": list(CLONE_POSITIONS),
        },
    )
    sigma_floor: float = field(
        default=1e-2,
        metadata={
            "help": "σ is floored at sigma_floor × the layer's mean σ, so a neuron that is (nearly) constant on "
            "the clean set cannot blow up the normalised clone loss."
        },
    )
    max_accuracy_drop: float | None = field(
        default=10.0,
        metadata={
            "help": "Points of clean accuracy the sanitized model may lose against the teacher before the run is "
            "flagged: a warning in the log, results.json and the model card, and recipes/clone.py exits non-zero "
            "unless --allow_accuracy_drop is given. None disables the check."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in an output_dir that holds checkpoints of an earlier run (they are deleted). "
            "Without it, recipes/clone.py resumes the last checkpoint when it belongs to the same teacher, data "
            "and settings, and refuses otherwise."
        },
    )
    hub_license: str | None = field(
        default=None,
        metadata={
            "help": "License id written to the model card (e.g. 'apache-2.0'): the teacher's license, which the "
            "sanitized model inherits. None writes 'unknown' and a note to check the teacher's license."
        },
    )
    importance_log_file: str | None = field(
        default="importance_diagnostics.jsonl",
        metadata={
            "help": "At each logging step, append per-layer importance diagnostics (effective support of each "
            "criterion and Σw) as one JSON line to this file in output_dir. None disables it."
        },
    )

    # --- TrainingArguments defaults that differ (see the class docstring) ---
    output_dir: str | None = field(default="medic-output", metadata={"help": "Where checkpoints and the model go."})
    learning_rate: float = field(default=1e-2, metadata={"help": "Initial learning rate (paper: 1e-2)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "Weight decay (paper: 1e-4, coupled L2)."})
    num_train_epochs: float = field(
        default=30.0,
        metadata={
            "help": "Epochs over the clean set. 30, not the paper's 60: longer runs let the backdoor back "
            "(docs/benchmarks.md)."
        },
    )
    save_strategy: str = field(default="epoch", metadata={"help": "When to save checkpoints."})
    save_total_limit: int | None = field(default=2, metadata={"help": "How many checkpoints to keep."})

    def __post_init__(self):
        super().__post_init__()
        if self.importance not in IMPORTANCE_MODES:
            raise ValueError(f"importance={self.importance!r}: choose one of {IMPORTANCE_MODES}.")
        if self.impact_scale not in IMPACT_SCALES:
            raise ValueError(f"impact_scale={self.impact_scale!r}: choose one of {IMPACT_SCALES}.")
        if self.stats_granularity not in STATS_GRANULARITIES:
            raise ValueError(f"stats_granularity={self.stats_granularity!r}: choose one of {STATS_GRANULARITIES}.")
        if self.clone_positions is not None and self.clone_positions not in CLONE_POSITIONS:
            raise ValueError(f"clone_positions={self.clone_positions!r}: choose one of {CLONE_POSITIONS}.")
        if self.clone_positions == "mean" and self.stats_granularity != "channel":
            raise ValueError(
                "clone_positions='mean' averages the positions that share a σ: set stats_granularity='channel'."
            )
        if isinstance(self.hook_layers, str):
            self.hook_layers = [kind.strip() for kind in self.hook_layers.split(",") if kind.strip()]
        unknown = set(self.hook_layers) - set(HOOK_LAYER_KINDS)
        if unknown or not self.hook_layers:
            raise ValueError(f"hook_layers={self.hook_layers!r}: use a non-empty subset of {HOOK_LAYER_KINDS}.")
        if self.temperature < 0 or (self.impact_temperature is not None and self.impact_temperature < 0):
            raise ValueError("temperature must be >= 0 (0 gives uniform weights, i.e. plain cloning).")
        if self.clone_loss_weight < 0:
            raise ValueError("clone_loss_weight must be >= 0.")
        if self.importance_cutoff < 0:
            raise ValueError("importance_cutoff must be >= 0.")
        if self.importance_top_fraction is not None and not 0 < self.importance_top_fraction <= 1:
            raise ValueError(f"importance_top_fraction={self.importance_top_fraction}: use a value in (0, 1] or None.")
        if self.final_temperature is not None and self.final_temperature < 0:
            raise ValueError("final_temperature must be >= 0 (or None for a constant τ).")
        if self.clone_loss_schedule not in CLONE_LOSS_SCHEDULES:
            raise ValueError(f"clone_loss_schedule={self.clone_loss_schedule!r}: use one of {CLONE_LOSS_SCHEDULES}.")
        if self.unlabeled_batch_size is not None and self.unlabeled_batch_size < 1:
            raise ValueError(f"unlabeled_batch_size={self.unlabeled_batch_size}: use a count >= 1, or None.")
        if self.unlabeled_loss not in UNLABELED_LOSSES:
            raise ValueError(f"unlabeled_loss={self.unlabeled_loss!r}: choose one of {UNLABELED_LOSSES}.")
        if self.mix_inputs not in MIX_INPUTS:
            raise ValueError(f"mix_inputs={self.mix_inputs!r}: choose one of {MIX_INPUTS}.")
        if not 0 <= self.logit_distillation <= 1:
            raise ValueError(f"logit_distillation={self.logit_distillation}: use a weight in [0, 1] (0: off).")
        if self.distillation_temperature <= 0:
            raise ValueError("distillation_temperature must be > 0.")
        if self.frozen_fraction is not None and not 0 <= self.frozen_fraction < 1:
            raise ValueError(f"frozen_fraction={self.frozen_fraction}: use a value in [0, 1), or None (automatic).")
        if self.frozen_fraction and self.freeze_modules is not None:
            raise ValueError("Give frozen_fraction or freeze_modules, not both: they both choose what stays frozen.")
        if not 0 <= self.early_lr_scale <= 1:
            raise ValueError(f"early_lr_scale={self.early_lr_scale}: use a value in [0, 1] (0: frozen).")
        if self.early_lr_scale and self.freeze_modules is not None:
            raise ValueError(
                "early_lr_scale applies to the modules of frozen_fraction; with freeze_modules, give early_lr_scale=0."
            )
        if self.base_warmup < 0:
            raise ValueError("base_warmup must be >= 0 (0: off).")
        if self.student_input_noise < 0:
            raise ValueError("student_input_noise must be >= 0 (0: off).")
        if not 0 <= self.student_input_blend < 1:
            raise ValueError(f"student_input_blend={self.student_input_blend}: choose a weight in [0, 1) (0: off).")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay}: use 0 (off) or a value in (0, 1), e.g. 0.998.")
        if self.mix_alpha <= 0:
            raise ValueError("mix_alpha must be > 0.")
        if self.sigma_floor <= 0:
            raise ValueError("sigma_floor must be > 0.")

    @property
    def effective_impact_temperature(self) -> float:
        return self.temperature if self.impact_temperature is None else self.impact_temperature
