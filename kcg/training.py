"""Training in-context learners with Flax NNX and optax (the design is in `kcg._src.training`).

`train(config, workdir)` fits the very `kcg.Transformer` class that `kcg.compile_cg` fills; configs are
`TrainConfig` dataclasses (built from ml_collections files by `config_from_dict`); `load_trained(workdir)`
loads a run back with `.predict(x_support, y_support, x_query)`, `.model` and `.config`.
"""

from kcg._src.checkpointing import CheckpointError
from kcg._src.checkpointing import Checkpointer
from kcg._src.checkpointing import read_config
from kcg._src.trained import TrainedModel
from kcg._src.trained import load_trained
from kcg._src.training import Batch
from kcg._src.training import CurriculumSpec
from kcg._src.training import DataSpec
from kcg._src.training import DECISION_TREE
from kcg._src.training import ENCODINGS
from kcg._src.training import FAMILIES
from kcg._src.training import ModelSpec
from kcg._src.training import OptimSpec
from kcg._src.training import Stage
from kcg._src.training import TrainConfig
from kcg._src.training import TrainResult
from kcg._src.training import baseline_suite
from kcg._src.training import config_from_dict
from kcg._src.training import config_to_dict
from kcg._src.training import curriculum_stage
from kcg._src.training import decision_tree_targets
from kcg._src.training import evaluate_trained
from kcg._src.training import init_state
from kcg._src.training import learning_rate_schedule
from kcg._src.training import load_history
from kcg._src.training import loss_fn
from kcg._src.training import make_batch
from kcg._src.training import make_batch_fn
from kcg._src.training import make_mesh
from kcg._src.training import make_optimizer
from kcg._src.training import make_predict_fn
from kcg._src.training import model_config
from kcg._src.training import predict
from kcg._src.training import sample_prompts
from kcg._src.training import train
from kcg._src.training import train_step_fn
from kcg._src.training import training_batch
from kcg._src.training import write_final_evaluation
from kcg._src.training import write_plots

__all__ = (
    "Batch", "CheckpointError", "Checkpointer", "CurriculumSpec", "DECISION_TREE", "DataSpec",
    "ENCODINGS", "FAMILIES", "ModelSpec", "OptimSpec", "Stage", "TrainConfig", "TrainResult",
    "TrainedModel", "baseline_suite", "config_from_dict", "config_to_dict", "curriculum_stage",
    "decision_tree_targets", "evaluate_trained", "init_state", "learning_rate_schedule",
    "load_history", "load_trained", "loss_fn", "make_batch", "make_batch_fn", "make_mesh",
    "make_optimizer", "make_predict_fn", "model_config", "predict", "read_config",
    "sample_prompts", "train", "train_step_fn", "training_batch", "write_final_evaluation",
    "write_plots",
)
