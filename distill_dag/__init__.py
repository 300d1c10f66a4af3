"""distill-dag: distill a transformer teacher into a RetNet student, as a Dagster pipeline.

Importing the package registers the RetNet student with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(student_dir)`` works after ``import distill_dag``.
"""

__version__ = "0.1.0"

from distill_dag.model import register_auto_classes as _register_auto_classes  # noqa: E402

_register_auto_classes()
