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
