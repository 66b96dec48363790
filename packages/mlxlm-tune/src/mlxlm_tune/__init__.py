"""mlxlm-tune: LoRA, DoRA, full and preference (DPO/ORPO) fine-tuning on MLX.

The adapter layers are core's (``mlxlm_core.adapters``), so what is trained here loads with
``pip install mlxlm-core`` alone, and in MLX-LM. This package adds the training side::

    from mlxlm_tune import TrainingConfig, train
    train(TrainingConfig(model="path/to/model", data="data/", iters=200, learning_rate=1e-4))

or piece by piece: :func:`load_dataset` / :func:`read_records` / :func:`encode_records`
(jsonl in text, completions, chat, tools or preference format), :class:`Batcher` (bucketing,
packing, resumable positions), losses (:func:`sft_loss`, :func:`make_dpo_loss`,
:func:`make_orpo_loss`), :func:`prepare_model`, :func:`build_optimizer`,
:class:`Trainer` with :class:`TrainingCallback` hooks, and :func:`fuse` for merging.
"""

from ._api import TrainResult, compute_reference, make_batcher, make_loss, train
from ._batching import Batch, Batcher, DataPosition, collate
from ._callbacks import (
    JSONLReporter,
    PrintReporter,
    ProgressBar,
    TrainingCallback,
    WandBReporter,
)
from ._config import LOSSES, TrainingConfig, load_yaml
from ._dataset import Dataset, DatasetSplits, encode_records, load_dataset, load_jsonl
from ._encode import PreferenceSample, Sample, encode_preference, encode_record
from ._fuse import FuseReport, fuse, fuse_model
from ._losses import (
    LossFn,
    dpo_loss,
    forward,
    make_dpo_loss,
    make_orpo_loss,
    orpo_loss,
    preference_margin,
    sequence_logprobs,
    sft_loss,
    token_logprobs,
)
from ._meta import check_base_model, model_fingerprint
from ._optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_schedule, schedule_from_config
from ._records import FORMATS, Record, detect_format, parse_records, read_records
from ._setup import (
    count_parameters,
    disable_grad_checkpoint,
    enable_grad_checkpoint,
    prepare_model,
)
from ._trainer import Trainer, TrainerOptions, evaluate

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "LOSSES",
    "OPTIMIZERS",
    "SCHEDULES",
    "Batch",
    "Batcher",
    "DataPosition",
    "Dataset",
    "DatasetSplits",
    "FuseReport",
    "JSONLReporter",
    "LossFn",
    "PreferenceSample",
    "PrintReporter",
    "ProgressBar",
    "Record",
    "Sample",
    "TrainResult",
    "Trainer",
    "TrainerOptions",
    "TrainingCallback",
    "TrainingConfig",
    "WandBReporter",
    "__version__",
    "build_optimizer",
    "build_schedule",
    "check_base_model",
    "collate",
    "compute_reference",
    "count_parameters",
    "detect_format",
    "disable_grad_checkpoint",
    "dpo_loss",
    "enable_grad_checkpoint",
    "encode_preference",
    "encode_record",
    "encode_records",
    "evaluate",
    "forward",
    "fuse",
    "fuse_model",
    "load_dataset",
    "load_jsonl",
    "load_yaml",
    "make_batcher",
    "make_dpo_loss",
    "make_loss",
    "make_orpo_loss",
    "model_fingerprint",
    "orpo_loss",
    "parse_records",
    "preference_margin",
    "prepare_model",
    "read_records",
    "schedule_from_config",
    "sequence_logprobs",
    "sft_loss",
    "token_logprobs",
    "train",
]
