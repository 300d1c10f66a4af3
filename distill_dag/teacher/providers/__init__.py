from distill_dag.loss.topk import TeacherError, TeacherProvider, TeacherTopK, check_vocab

__all__ = ["TeacherError", "TeacherProvider", "TeacherTopK", "check_vocab"]
