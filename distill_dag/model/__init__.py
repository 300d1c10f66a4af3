"""RetNet student (owned by the model issue). ``register_auto_classes`` is called on package import."""


def register_auto_classes() -> None:
    """Register RetNetConfig / RetNetForCausalLM with AutoConfig / AutoModelForCausalLM (idempotent)."""
    try:
        from distill_dag.model.retnet import RetNetConfig, RetNetForCausalLM
    except ModuleNotFoundError as err:  # model not written yet
        if err.name == "distill_dag.model.retnet":
            return
        raise
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(RetNetConfig.model_type, RetNetConfig)
        AutoModelForCausalLM.register(RetNetConfig, RetNetForCausalLM)
    except ValueError:  # already registered
        pass


_LAZY = {
    "RetNetConfig": "distill_dag.model.retnet",
    "RetNetModel": "distill_dag.model.retnet",
    "RetNetForCausalLM": "distill_dag.model.retnet",
    "RetNetCache": "distill_dag.model.retnet",
    "student_config": "distill_dag.model.variants",
    "build_student": "distill_dag.model.variants",
    "count_parameters": "distill_dag.model.variants",
}


def __getattr__(name: str):
    """``from distill_dag.model import RetNetForCausalLM`` etc., imported on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distill_dag.model' has no attribute {name!r}")
