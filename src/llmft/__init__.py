"""llmft: experiment-tracked LoRA instruction fine-tuning (DVC pipeline, MLflow tracking and registry, Optuna)."""
import logging
import warnings


def _quiet() -> None:
    """Silence what a user of llmft cannot act on, each by category, module and message (others still show):
    deprecations inside PEFT/TRL's own calls into transformers, and MLflow's advice on how to log a model,
    which llmft has already decided (an explicit signature, a pickled PythonModel that ships its code)."""
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`is_gradient_checkpointing` is deprecated")
    warnings.filterwarnings("ignore", category=UserWarning, message=r".*An input example was not provided")
    logging.getLogger("mlflow.pyfunc").addFilter(
        lambda record: "Passing a Python object as `python_model`" not in record.getMessage())


_quiet()
