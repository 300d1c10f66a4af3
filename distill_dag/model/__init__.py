"""RetNet student: the model (``retnet``), named sizes (``variants``), teacher conversion (``convert``) and the
Hugging Face Hub folder (``hub``; its ``shipped_code`` (modeling code) and ``model_card``).

``register_auto_classes`` is called on ``import distill_dag``: it registers the student with transformers'
AutoConfig / AutoModelForCausalLM, so ``from_pretrained`` needs no ``trust_remote_code`` inside the package.
"""


def register_auto_classes() -> None:
    """Register RetNetConfig / RetNetForCausalLM with AutoConfig / AutoModelForCausalLM (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill_dag.model.retnet import RetNetConfig, RetNetForCausalLM  # lazy: torch and transformers load only when the Auto classes are registered

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
