"""Composing the student network: the teacher with its distilled neighbourhoods replaced."""

from keras_nd import graph, sparsity

__all__ = ["compose"]


def compose(teacher, students, name=None):
  """The student network: `teacher` with each distilled neighbourhood replaced by its student.

  The result owns its weights (nothing is shared with the teacher or with the
  student models), so fine-tuning it leaves both untouched.

  Args:
    teacher: the functional teacher model the neighbourhoods were split from.
    students: dict `{Neighbourhood: student model}`, e.g.
      `NeighbourhoodDistiller.students` after training.
    name: the model's name (default: teacher's name + "_student").

  Returns:
    A flat functional `keras.Model`. Students holding tfmot pruning wrappers
    (`keras_nd.sparsity`) are stripped first: the result is a plain model
    with sparse kernels.
  """
  students = {hood: sparsity.strip(model) if sparsity.prunes(model) else model
              for hood, model in dict(students).items()}
  return graph.substitute(teacher, students, copy=True, name=name or f"{teacher.name}_student")
