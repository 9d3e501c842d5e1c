"""Training in-context learners with Flax NNX and optax (the design is in `kcg._src.training`).

`train(config, workdir)` fits the very `kcg.Transformer` class that `kcg.compile_cg` fills; configs are
`TrainConfig` dataclasses (built from ml_collections files by `config_from_dict`); `load_trained(workdir)`
loads a run back with `.predict(x_support, y_support, x_query)`, `.model` and `.config`.
"""

from kcg._src.checkpointing import CheckpointError
from kcg._src.checkpointing import Checkpointer
from kcg._src.checkpointing import read_config
from kcg._src.plotting import training_plots as write_plots
from kcg._src.train_config import DECISION_TREE
from kcg._src.train_config import ENCODINGS
from kcg._src.train_config import FAMILIES
from kcg._src.train_config import CurriculumSpec
from kcg._src.train_config import DataSpec
from kcg._src.train_config import ModelSpec
from kcg._src.train_config import OptimSpec
from kcg._src.train_config import TrainConfig
from kcg._src.train_config import config_from_dict
from kcg._src.train_config import config_to_dict
from kcg._src.train_config import model_config
from kcg._src.train_data import Batch
from kcg._src.train_data import Stage
from kcg._src.train_data import curriculum_stage
from kcg._src.train_data import decision_tree_targets
from kcg._src.train_data import make_batch
from kcg._src.train_data import sample_prompts
from kcg._src.train_data import training_batch
from kcg._src.train_eval import baseline_suite
from kcg._src.train_eval import evaluate_trained
from kcg._src.train_eval import make_predict_fn
from kcg._src.train_eval import predict
from kcg._src.train_eval import write_final_evaluation
from kcg._src.train_metrics import load_history
from kcg._src.train_optim import learning_rate_schedule
from kcg._src.train_optim import make_optimizer
from kcg._src.trained import TrainedModel
from kcg._src.trained import load_trained
from kcg._src.training import DivergenceError
from kcg._src.training import TrainResult
from kcg._src.training import init_state
from kcg._src.training import loss_fn
from kcg._src.training import make_batch_fn
from kcg._src.training import make_mesh
from kcg._src.training import train
from kcg._src.training import train_step_fn

__all__ = (
    "Batch", "CheckpointError", "Checkpointer", "CurriculumSpec", "DECISION_TREE", "DataSpec",
    "DivergenceError", "ENCODINGS", "FAMILIES", "ModelSpec", "OptimSpec", "Stage", "TrainConfig",
    "TrainResult", "TrainedModel", "baseline_suite", "config_from_dict", "config_to_dict",
    "curriculum_stage", "decision_tree_targets", "evaluate_trained", "init_state",
    "learning_rate_schedule", "load_history", "load_trained", "loss_fn", "make_batch",
    "make_batch_fn", "make_mesh", "make_optimizer", "make_predict_fn", "model_config", "predict",
    "read_config", "sample_prompts", "train", "train_step_fn", "training_batch",
    "write_final_evaluation", "write_plots",
)
