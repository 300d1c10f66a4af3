from distill_dag.distill.teachers.base import TeacherError, TeacherProvider, TeacherTopK, check_vocab

__all__ = ["TeacherError", "TeacherProvider", "TeacherTopK", "check_vocab"]
