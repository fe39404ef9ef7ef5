"""Names shared by the data side and the trainer, kept below both so that neither imports the other."""

# An optional batch key: the same images prepared for the teacher when its image processor differs.
TEACHER_INPUT = "teacher_pixel_values"
# The batch key of the training example's index, which keys the teacher's stored outputs.
INDEX_KEY = "udkd_index"
# The batch key of the view (augmentation replay) a training example was read in; the store's second key.
VIEW_KEY = "udkd_view"
# The label of an unlabelled example (PyTorch's and transformers' ignore index): it gets the distillation terms only.
IGNORE_INDEX = -100
