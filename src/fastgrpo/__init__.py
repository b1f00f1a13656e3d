"""fastgrpo: GRPO fine-tuning with vLLM generation; TRL's GRPOTrainer surface, its own engine."""

from .config import ConfigError, GRPOConfig
from .trainer import GRPOTrainer, TrainOutput

__all__ = ["GRPOConfig", "GRPOTrainer", "ConfigError", "TrainOutput"]
__version__ = "0.1.0"
